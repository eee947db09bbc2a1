import pytest

from hwcompress.errors import TargetError
from hwcompress.targets import Int8Kind, list_targets, load_target, runnable_here, spec_from_dict, targets_dir

SHIPPED = sorted(p.stem for p in targets_dir().glob("*.toml"))


def test_all_planned_targets_ship():
    assert {"host", "x86-avx512", "arm-cortex-a72", "arm-cortex-a76", "jetson-orin", "cuda-sm80", "npu-stub"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_target_loads_and_round_trips(name):
    spec = load_target(name)
    assert spec.name == name and spec.description
    spec.tvm_target()  # TVM accepts it
    assert spec_from_dict(spec.to_dict()) == spec


def test_host_resolves_this_cpu():
    spec = load_target("host")
    assert spec.tvm["mcpu"] not in ("host", "generic")
    assert isinstance(spec.tvm["num-cores"], int) and spec.tvm["num-cores"] >= 1
    assert runnable_here(spec) == (True, "")


def test_inheritance_overrides_and_keeps():
    a76, a72 = load_target("arm-cortex-a76"), load_target("arm-cortex-a72")
    assert a76.hardware.int8 is Int8Kind.SDOT and a72.hardware.int8 is Int8Kind.NEON
    assert a76.toolchain.cc == a72.toolchain.cc == "aarch64-linux-gnu-g++"
    orin = load_target("jetson-orin")
    assert orin.tvm["arch"] == "sm_87" and orin.arch == "aarch64" and orin.hardware.sparse_2_4


def test_cross_targets_are_not_native():
    assert runnable_here(load_target("arm-cortex-a72"))[0] is False
    assert "aarch64" in runnable_here(load_target("arm-cortex-a72"))[1]


def test_list_targets_sorted():
    assert [s.name for s in list_targets()] == SHIPPED


def _write(tmp_path, text, name="t.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, field",
    [
        ('name = "x"\n[tvm]\nkind = "llvm"\n[hardware]\nint8 = "avx9"\n', "[hardware].int8"),
        ('name = "x"\n[tvm]\nkind = "llvm"\n[hardware]\nchannel_multiple = "8"\n', "[hardware].channel_multiple"),
        ('name = "x"\n[tvm]\nkind = "llvm"\n[hardware]\nchanel_multiple = 8\n', "chanel_multiple"),
        ('name = "x"\n[tvm]\nkind = "llvm"\nbogus = 1\n', "bogus"),
        ('name = "x"\n', "[tvm].kind"),
        ('[tvm]\nkind = "llvm"\n', "name"),
        ('name = "x"\n[tvm]\nkind = "llvm"\nmtriple = "x86_64-linux-gnu"\nmcpu = "not-a-cpu"\n', "[tvm]"),
        ('name = "x"\n[tvm\nkind = "llvm"\n', "not valid TOML"),
        ('name = "x"\nbase = "nope-target"\n[tvm]\nkind = "llvm"\n', "nope-target"),
    ],
)
def test_bad_target_file_names_file_and_field(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(TargetError) as err:
        load_target(path)
    assert path in str(err.value) or "nope-target" in str(err.value)
    assert field in str(err.value)


def test_unknown_target_name_lists_known():
    with pytest.raises(TargetError, match="unknown target 'nope'.*host"):
        load_target("nope")


def test_custom_target_file_inherits_shipped(tmp_path):
    path = _write(tmp_path, 'name = "my-host"\nbase = "host"\n[hardware]\nchannel_multiple = 32\n')
    spec = load_target(path)
    assert spec.name == "my-host" and spec.hardware.channel_multiple == 32
    assert spec.tvm == load_target("host").tvm
