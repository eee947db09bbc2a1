// hwc_runner: deploy runner for hwcompress artifacts.
//
// Loads an exported TVM Relax VM module (module.so), reads the inputs of `main` from .npy
// files, runs `main` on the CPU, writes every output as .npy and can time the run.
//
//   hwc_runner MODULE.so --input in0.npy [--input in1.npy ...] [--output-dir DIR]
//              [--repeat N] [--warmup W] [--threads T] [--json]
//
// stdout: with --json or --repeat, one JSON object
//   {"outputs": [{"file": ..., "dtype": ..., "shape": [...]}, ...],
//    "latencies_ms": [...], "median_ms": x, "p90_ms": x, "mean_ms": x, "min_ms": x}
// (timing keys only with --repeat); otherwise one human-readable line per output.
// Errors: one line "hwc_runner: error: ..." on stderr, exit code 2.
//
// Built against the TVM runtime of the apache-tvm / apache-tvm-ffi wheels (see build.sh);
// the binary has rpath $ORIGIN, so libtvm_runtime.so and libtvm_ffi.so sit next to it.

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

namespace ffi = tvm::ffi;

namespace {

const char* kVersion = "hwc_runner 0.1 (TVM 0.27 Relax VM)";

// Every failure the user can cause is reported as a UserError: one line, exit code 2.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string OneLine(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  bool space = false;
  for (char c : s) {
    if (c == '\n' || c == '\r' || c == '\t') {
      space = true;
      continue;
    }
    if (space && !out.empty()) out.push_back(' ');
    space = false;
    out.push_back(c);
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

// ---------------------------------------------------------------------------------------------
// dtypes

struct DTypeInfo {
  const char* descr;  // numpy descr without byte-order char
  const char* name;   // numpy name
  DLDataType dl;
};

const DTypeInfo kDTypes[] = {
    {"f4", "float32", {kDLFloat, 32, 1}}, {"f2", "float16", {kDLFloat, 16, 1}},
    {"f8", "float64", {kDLFloat, 64, 1}}, {"i1", "int8", {kDLInt, 8, 1}},
    {"u1", "uint8", {kDLUInt, 8, 1}},     {"i2", "int16", {kDLInt, 16, 1}},
    {"u2", "uint16", {kDLUInt, 16, 1}},   {"i4", "int32", {kDLInt, 32, 1}},
    {"u4", "uint32", {kDLUInt, 32, 1}},   {"i8", "int64", {kDLInt, 64, 1}},
    {"u8", "uint64", {kDLUInt, 64, 1}},   {"b1", "bool", {kDLBool, 8, 1}},
};

const DTypeInfo* FindByDescr(const std::string& d) {
  for (const auto& t : kDTypes)
    if (d == t.descr) return &t;
  return nullptr;
}

const DTypeInfo* FindByDL(DLDataType dt) {
  for (const auto& t : kDTypes)
    if (t.dl.code == dt.code && t.dl.bits == dt.bits && t.dl.lanes == dt.lanes) return &t;
  return nullptr;
}

std::string DLName(DLDataType dt) {
  if (const DTypeInfo* t = FindByDL(dt)) return t->name;
  std::ostringstream os;
  os << "dtype(code=" << int(dt.code) << ",bits=" << int(dt.bits) << ",lanes=" << dt.lanes << ")";
  return os.str();
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

// ---------------------------------------------------------------------------------------------
// npy reading / writing (format versions 1.0, 2.0, 3.0; little-endian, C order)

struct NpyArray {
  const DTypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

// Value of key `key` in the header dict, as the raw text up to the next top-level ',' or '}'.
std::string HeaderValue(const std::string& header, const std::string& key, const std::string& file) {
  std::string pat1 = "'" + key + "'", pat2 = "\"" + key + "\"";
  size_t p = header.find(pat1);
  if (p == std::string::npos) p = header.find(pat2);
  if (p == std::string::npos) throw UserError(file + ": not a valid .npy file (no '" + key + "' in header)");
  p = header.find(':', p);
  if (p == std::string::npos) throw UserError(file + ": not a valid .npy file (bad header)");
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  size_t end = p;
  if (end < header.size() && header[end] == '(') {
    end = header.find(')', end);
    if (end == std::string::npos) throw UserError(file + ": not a valid .npy file (bad shape)");
    ++end;
  } else if (end < header.size() && (header[end] == '\'' || header[end] == '"')) {
    char q = header[end];
    end = header.find(q, end + 1);
    if (end == std::string::npos) throw UserError(file + ": not a valid .npy file (bad header)");
    ++end;
  } else {
    while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  }
  std::string v = header.substr(p, end - p);
  while (!v.empty() && v.back() == ' ') v.pop_back();
  return v;
}

NpyArray ReadNpy(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw UserError(file + ": cannot open input file");
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw UserError(file + ": not a .npy file (bad magic)");
  int major = static_cast<unsigned char>(magic[6]);
  uint32_t hlen = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!in.read(reinterpret_cast<char*>(b), 2)) throw UserError(file + ": truncated .npy header");
    hlen = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!in.read(reinterpret_cast<char*>(b), 4)) throw UserError(file + ": truncated .npy header");
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  } else {
    throw UserError(file + ": unsupported .npy format version " + std::to_string(major));
  }
  if (hlen > (1u << 20)) throw UserError(file + ": .npy header too large");
  std::string header(hlen, '\0');
  if (!in.read(&header[0], hlen)) throw UserError(file + ": truncated .npy header");

  std::string descr = HeaderValue(header, "descr", file);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"'))
    throw UserError(file + ": unsupported dtype " + descr + " (structured/object arrays are not supported)");
  descr = descr.substr(1, descr.size() - 2);
  char order = descr.empty() ? '?' : descr[0];
  std::string base = descr.size() > 1 ? descr.substr(1) : descr;
  const DTypeInfo* dt = FindByDescr(base);
  if (!dt) throw UserError(file + ": unsupported dtype '" + descr + "'");
  if (order == '>' && dt->dl.bits > 8)
    throw UserError(file + ": big-endian dtype '" + descr + "' is not supported; save it as little-endian ('<')");
  if (order != '<' && order != '|' && order != '=' && !(order == '>' && dt->dl.bits <= 8))
    throw UserError(file + ": unsupported dtype '" + descr + "'");

  std::string fortran = HeaderValue(header, "fortran_order", file);
  if (fortran == "True")
    throw UserError(file + ": array is in Fortran order; save a C-contiguous array (numpy.ascontiguousarray)");
  if (fortran != "False") throw UserError(file + ": not a valid .npy file (bad fortran_order)");

  std::string shape_s = HeaderValue(header, "shape", file);
  if (shape_s.size() < 2 || shape_s.front() != '(' || shape_s.back() != ')')
    throw UserError(file + ": not a valid .npy file (bad shape)");
  NpyArray arr;
  arr.dtype = dt;
  {
    std::string inner = shape_s.substr(1, shape_s.size() - 2);
    std::stringstream ss(inner);
    std::string tok;
    while (std::getline(ss, tok, ',')) {
      size_t a = tok.find_first_not_of(" L"), b = tok.find_last_not_of(" L");
      if (a == std::string::npos) continue;
      tok = tok.substr(a, b - a + 1);
      char* endp = nullptr;
      long long v = std::strtoll(tok.c_str(), &endp, 10);
      if (*endp != '\0' || v < 0) throw UserError(file + ": not a valid .npy file (bad shape " + shape_s + ")");
      arr.shape.push_back(v);
    }
  }
  size_t numel = 1;
  for (int64_t d : arr.shape) numel *= static_cast<size_t>(d);
  size_t nbytes = numel * (dt->dl.bits / 8);
  arr.data.resize(nbytes);
  if (nbytes && !in.read(arr.data.data(), nbytes))
    throw UserError(file + ": truncated .npy data (expected " + std::to_string(nbytes) + " bytes for shape " +
                    ShapeStr(arr.shape) + ")");
  return arr;
}

void WriteNpy(const std::string& file, const ffi::Tensor& t) {
  const DTypeInfo* dt = FindByDL(t.dtype());
  if (!dt) throw UserError("output " + file + " has unsupported dtype " + DLName(t.dtype()));
  if (t.device().device_type != kDLCPU) throw UserError("output " + file + " is not on the CPU");
  if (!t.IsContiguous()) throw UserError("output " + file + " is not contiguous");
  std::string descr = std::string(dt->dl.bits == 8 ? "|" : "<") + dt->descr;
  std::ostringstream h;
  h << "{'descr': '" << descr << "', 'fortran_order': False, 'shape': (";
  for (int i = 0; i < t.ndim(); ++i) h << (i ? ", " : "") << t.shape()[i];
  if (t.ndim() == 1) h << ",";
  h << "), }";
  std::string header = h.str();
  // Pad so that magic(6)+version(2)+len(2)+header+'\n' is a multiple of 64.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(file, std::ios::binary);
  if (!out) throw UserError(file + ": cannot open output file for writing");
  out.write("\x93NUMPY\x01\x00", 8);
  unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                          static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<char*>(len), 2);
  out.write(header.data(), header.size());
  size_t nbytes = ffi::GetDataSize(t);
  out.write(static_cast<const char*>(t.data_ptr()) + t.byte_offset(), nbytes);
  if (!out) throw UserError(file + ": write failed");
}

// ---------------------------------------------------------------------------------------------
// tensors

struct AlignedCPUAlloc {
  void AllocData(DLTensor* tensor) {
    size_t n = std::max<size_t>(ffi::GetDataSize(*tensor), 1);
    n = (n + 63) / 64 * 64;
    tensor->data = std::aligned_alloc(64, n);
    if (!tensor->data) throw std::bad_alloc();
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

ffi::Tensor ToTensor(const NpyArray& a) {
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::ShapeView(a.shape.data(), a.shape.size()),
                                           a.dtype->dl, DLDevice{kDLCPU, 0});
  if (!a.data.empty()) std::memcpy(t.data_ptr(), a.data.data(), a.data.size());
  return t;
}

void Flatten(const ffi::Any& v, std::vector<ffi::Tensor>* out) {
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = v.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& e : *arr) Flatten(e, out);
  } else {
    throw UserError("main returned a value that is not a tensor or a tuple of tensors (type " + v.GetTypeKey() +
                    ")");
  }
}

// ---------------------------------------------------------------------------------------------
// CLI

struct Options {
  std::string module;
  std::vector<std::string> inputs;
  std::string output_dir;
  std::string func = "main";
  int repeat = 0;
  int warmup = 0;
  int threads = 0;
  bool json = false;
};

void Usage(std::ostream& os) {
  os << "usage: hwc_runner MODULE.so --input IN.npy [--input IN2.npy ...] [--output-dir DIR]\n"
        "                  [--repeat N] [--warmup W] [--threads T] [--func NAME] [--json]\n"
        "Runs NAME (default main) of an exported TVM Relax VM module on the CPU.\n"
        "  --input FILE      input .npy, one per parameter, in order (C order, little-endian)\n"
        "  --output-dir DIR  write outputs as DIR/out0.npy, DIR/out1.npy, ... (default: .)\n"
        "  --repeat N        time N runs after the first; prints latencies as JSON\n"
        "  --warmup W        untimed runs before the timed ones\n"
        "  --threads T       TVM worker threads (sets TVM_NUM_THREADS)\n"
        "  --json            print a JSON summary on stdout\n"
        "Errors print one line on stderr and exit with code 2.\n";
}

int ParseInt(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < 0 || x > 1000000) throw UserError(flag + " needs a non-negative integer, got '" + v + "'");
  return static_cast<int>(x);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string val;
    bool has_eq = false;
    if (a.rfind("--", 0) == 0) {
      size_t eq = a.find('=');
      if (eq != std::string::npos) {
        val = a.substr(eq + 1);
        a = a.substr(0, eq);
        has_eq = true;
      }
    }
    auto next = [&]() -> std::string {
      if (has_eq) return val;
      if (i + 1 >= argc) throw UserError(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      Usage(std::cout);
      std::exit(0);
    } else if (a == "--version") {
      std::cout << kVersion << "\n";
      std::exit(0);
    } else if (a == "--input" || a == "-i") {
      o.inputs.push_back(next());
    } else if (a == "--output-dir" || a == "-o") {
      o.output_dir = next();
    } else if (a == "--repeat") {
      o.repeat = ParseInt(a, next());
    } else if (a == "--warmup") {
      o.warmup = ParseInt(a, next());
    } else if (a == "--threads") {
      o.threads = ParseInt(a, next());
    } else if (a == "--func") {
      o.func = next();
    } else if (a == "--json") {
      o.json = true;
    } else if (!a.empty() && a[0] == '-') {
      throw UserError("unknown option " + a + " (see --help)");
    } else if (o.module.empty()) {
      o.module = a;
    } else {
      throw UserError("unexpected argument '" + a + "' (inputs are given with --input)");
    }
  }
  if (o.module.empty()) throw UserError("no module given (usage: hwc_runner MODULE.so --input IN.npy ...)");
  if (o.output_dir.empty()) o.output_dir = ".";
  return o;
}

std::string JsonStr(const std::string& s) {
  std::string r = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      r += '\\';
      r += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      r += buf;
    } else {
      r += c;
    }
  }
  return r + "\"";
}

std::string JsonNum(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6f", v);
  return buf;
}

double Percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  double pos = q * (v.size() - 1);
  size_t lo = static_cast<size_t>(pos);
  size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

// Refuse a module built for another architecture with a clear message (dlopen's own message
// is confusing, especially under qemu-user).
void CheckModuleArch(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  unsigned char h[20] = {0};
  if (!in.read(reinterpret_cast<char*>(h), sizeof(h)) || std::memcmp(h, "\x7f" "ELF", 4) != 0)
    throw UserError(file + ": not an ELF shared library (expected the module.so exported by hwcompress)");
  uint16_t machine = static_cast<uint16_t>(h[18] | (h[19] << 8));
  auto name = [](uint16_t m) -> std::string {
    switch (m) {
      case 62: return "x86_64";
      case 183: return "aarch64";
      case 40: return "arm (32-bit)";
      case 243: return "riscv";
      default: return "ELF machine " + std::to_string(m);
    }
  };
#if defined(__aarch64__)
  const uint16_t self = 183;
#elif defined(__x86_64__)
  const uint16_t self = 62;
#else
  const uint16_t self = machine;
#endif
  if (machine != self)
    throw UserError(file + ": module is built for " + name(machine) + ", this runner is " + name(self));
}

int Run(const Options& o) {
  if (o.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(o.threads).c_str(), 1);

  struct stat st;
  if (stat(o.module.c_str(), &st) != 0) throw UserError(o.module + ": module file not found");
  char resolved[PATH_MAX];
  if (!realpath(o.module.c_str(), resolved)) throw UserError(o.module + ": cannot resolve path");
  if (stat(o.output_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw UserError(o.output_dir + ": output directory does not exist");

  std::vector<NpyArray> arrays;
  for (const std::string& f : o.inputs) arrays.push_back(ReadNpy(f));

  CheckModuleArch(resolved);
  ffi::Module lib = ffi::Module::LoadFromFile(resolved);
  ffi::Optional<ffi::Function> load_exec = lib->GetFunction("vm_load_executable");
  if (!load_exec) throw UserError(o.module + ": not a Relax VM module (no vm_load_executable)");
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  ffi::Optional<ffi::Function> init = vm->GetFunction("vm_initialization");
  if (!init) throw UserError(o.module + ": VM has no vm_initialization");
  // (device_type, device_id, allocator) per device: CPU 0, pooled allocator.
  (*init)(static_cast<int>(kDLCPU), 0, 2);

  ffi::Optional<ffi::Function> func = vm->GetFunction(ffi::String(o.func));
  if (!func) throw UserError(o.module + ": module has no function '" + o.func + "'");

  // Check the number of arguments against the function's parameters.
  if (ffi::Optional<ffi::Function> arity_f = vm->GetFunction("get_function_arity")) {
    int64_t arity = -1;
    try {
      arity = (*arity_f)(ffi::String(o.func)).cast<int64_t>();
    } catch (const ffi::Error&) {
      arity = -1;
    }
    if (arity >= 0 && arity != static_cast<int64_t>(arrays.size())) {
      std::string names;
      if (ffi::Optional<ffi::Function> pn = vm->GetFunction("get_function_param_name")) {
        for (int64_t i = 0; i < arity; ++i) {
          try {
            names += (i ? ", " : "") + std::string((*pn)(ffi::String(o.func), i).cast<ffi::String>());
          } catch (const ffi::Error&) {
          }
        }
      }
      throw UserError(o.func + " takes " + std::to_string(arity) + " input(s)" +
                      (names.empty() ? "" : " (" + names + ")") + ", got " + std::to_string(arrays.size()) +
                      " --input file(s)");
    }
  }

  std::vector<ffi::Tensor> tensors;
  for (const NpyArray& a : arrays) tensors.push_back(ToTensor(a));
  std::vector<ffi::AnyView> args(tensors.begin(), tensors.end());

  ffi::Function main_f = *func;
  auto call = [&]() {
    ffi::Any result;
    main_f.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    return result;
  };

  ffi::Any result = call();
  std::vector<ffi::Tensor> outs;
  Flatten(result, &outs);
  std::vector<std::string> files, descs;
  for (size_t i = 0; i < outs.size(); ++i) {
    std::string f = o.output_dir + "/out" + std::to_string(i) + ".npy";
    WriteNpy(f, outs[i]);
    files.push_back(f);
    std::ostringstream d;
    d << "\"dtype\": " << JsonStr(DLName(outs[i].dtype())) << ", \"shape\": [";
    for (int k = 0; k < outs[i].ndim(); ++k) d << (k ? ", " : "") << outs[i].shape()[k];
    d << "]";
    descs.push_back(d.str());
  }
  result = ffi::Any();
  outs.clear();

  std::vector<double> lat;
  if (o.repeat > 0) {
    for (int i = 0; i < o.warmup; ++i) call();
    for (int i = 0; i < o.repeat; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      ffi::Any r = call();
      auto t1 = std::chrono::steady_clock::now();
      lat.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  }

  if (o.json || o.repeat > 0) {
    std::ostringstream js;
    js << "{\"outputs\": [";
    for (size_t i = 0; i < files.size(); ++i) {
      js << (i ? ", " : "") << "{\"file\": " << JsonStr(files[i]) << ", " << descs[i] << "}";
    }
    js << "]";
    if (o.repeat > 0) {
      js << ", \"repeat\": " << o.repeat << ", \"warmup\": " << o.warmup << ", \"latencies_ms\": [";
      for (size_t i = 0; i < lat.size(); ++i) js << (i ? ", " : "") << JsonNum(lat[i]);
      double mean = std::accumulate(lat.begin(), lat.end(), 0.0) / lat.size();
      js << "], \"median_ms\": " << JsonNum(Percentile(lat, 0.5)) << ", \"p90_ms\": " << JsonNum(Percentile(lat, 0.9))
         << ", \"mean_ms\": " << JsonNum(mean) << ", \"min_ms\": " << JsonNum(*std::min_element(lat.begin(), lat.end()));
    }
    js << "}";
    std::cout << js.str() << std::endl;
  } else {
    for (const std::string& f : files) std::cout << f << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const UserError& e) {
    std::cerr << "hwc_runner: error: " << OneLine(e.what()) << std::endl;
  } catch (const ffi::Error& e) {
    std::cerr << "hwc_runner: error: " << OneLine(e.kind() + ": " + e.message()) << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "hwc_runner: error: " << OneLine(e.what()) << std::endl;
  }
  return 2;
}
