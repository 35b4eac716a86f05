// librtrt: the C++ API of rtrt (rtrt/rtrt.hpp), a thin layer over the embedded Python runtime.
//
// Every call goes to rtrt.runtime.pipeline.Pipeline, so C++ and `rtrt infer` share one
// implementation. The interpreter is started once (std::call_once) unless the host already runs
// Python, and the GIL is released right after, so any C++ thread can take it for its call.
// Images are handed to Python as read-only numpy views of the caller's buffer (no copy here; the
// runtime converts them to its own image before the call returns).
#include "rtrt/rtrt.hpp"

#include <pybind11/embed.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <utility>

#ifndef RTRT_PYTHON_EXECUTABLE
#define RTRT_PYTHON_EXECUTABLE ""
#endif

namespace py = pybind11;
using namespace pybind11::literals;

namespace rtrt {

Error::Error(ErrorKind kind, const std::string& python_type, const std::string& message, std::string traceback)
    : std::runtime_error(message), kind_(kind), python_type_(python_type), traceback_(std::move(traceback)) {}

namespace {

// ------------------------------------------------------------------ interpreter
std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// A venv made with this Python's major.minor (a venv of another version would load a foreign stdlib).
bool venv_fits(const std::string& venv) {
  std::ifstream cfg(venv + "/pyvenv.cfg");
  const std::string want = std::to_string(PY_MAJOR_VERSION) + "." + std::to_string(PY_MINOR_VERSION) + ".";
  std::string line;
  while (std::getline(cfg, line)) {
    const auto eq = line.find('=');
    if (eq == std::string::npos) continue;
    const std::string key = trim(line.substr(0, eq));
    if (key == "version" || key == "version_info") return trim(line.substr(eq + 1)).rfind(want, 0) == 0;
  }
  return false;
}

// The python executable whose environment (venv, site-packages) the interpreter takes on:
// Python's own start-up finds pyvenv.cfg next to it, exactly as when that python runs.
std::string embedded_python() {
  std::string exe = env("RTRT_PYTHON");
  if (!exe.empty()) return exe;
  const std::string venv = env("VIRTUAL_ENV");
  if (!venv.empty() && venv_fits(venv) && std::filesystem::exists(venv + "/bin/python")) return venv + "/bin/python";
  return RTRT_PYTHON_EXECUTABLE;
}

void start_python() {
  if (Py_IsInitialized()) return;  // the host runs Python: share its interpreter, leave its GIL alone
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.parse_argv = 0;
  config.install_signal_handlers = 0;  // SIGINT & co. stay the host's (a ROS 2 node handles them)
  config.buffered_stdio = 0;           // the interpreter is never finalised, so nothing may wait in a buffer
  const std::string exe = embedded_python();
  if (!exe.empty()) {
    PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, exe.c_str());
    if (PyStatus_Exception(st)) {
      PyConfig_Clear(&config);
      throw Error(ErrorKind::Python, "", "cannot start the embedded Python: bad executable path " + exe);
    }
  }
  try {
    py::initialize_interpreter(&config, 0, nullptr, /*add_program_dir_to_path=*/false);
  } catch (const std::exception& e) {
    throw Error(ErrorKind::Python, "", std::string("cannot start the embedded Python (") + exe + "): " + e.what());
  }
  // Never finalised: torch and onnxruntime do not survive Py_Finalize, and Pipelines may live in
  // statics. Release the GIL now; each call takes it with gil_scoped_acquire.
  PyEval_SaveThread();
}

void ensure_python() {
  static std::once_flag once;
  std::call_once(once, start_python);  // a throw leaves the flag unset, so a later call retries
}

// Python objects used by every call, imported once. Guarded by the GIL (not a C++ static guard:
// a thread blocked on that guard while holding the GIL would deadlock an import that yields it).
struct PyApi {
  py::object pipeline_cls, load_image, default_question, region_question;
  std::vector<std::pair<py::object, ErrorKind>> errors;  // most specific first
  py::object format_exception;
};

PyApi* g_api = nullptr;  // leaked on purpose: it must outlive every Pipeline and the interpreter is never finalised

PyApi& api() {  // GIL held
  if (g_api) return *g_api;
  auto* a = new PyApi();
  py::module_ errors = py::module_::import("rtrt.runtime.errors");
  a->errors = {
      {errors.attr("BundleError"), ErrorKind::Bundle},
      {errors.attr("ImageError"), ErrorKind::Image},
      {errors.attr("InputError"), ErrorKind::Input},
      {errors.attr("ModelMismatchError"), ErrorKind::ModelMismatch},
      {errors.attr("EngineMismatchError"), ErrorKind::EngineMismatch},
      {errors.attr("EngineBuildError"), ErrorKind::EngineBuild},
      {errors.attr("BackendUnavailableError"), ErrorKind::BackendUnavailable},
      {errors.attr("ParityError"), ErrorKind::Parity},
      {errors.attr("RtrtError"), ErrorKind::Rtrt},
  };
  a->format_exception = py::module_::import("traceback").attr("format_exception");
  py::module_ pipeline = py::module_::import("rtrt.runtime.pipeline");
  a->pipeline_cls = pipeline.attr("Pipeline");
  a->default_question = pipeline.attr("DEFAULT_QUESTION");
  a->region_question = pipeline.attr("REGION_QUESTION");
  a->load_image = py::module_::import("rtrt.runtime.image").attr("load_image");
  if (g_api) {  // another thread finished first while an import let the GIL go
    delete a;
    return *g_api;
  }
  g_api = a;
  return *g_api;
}

// ------------------------------------------------------------------ errors
std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

Error to_error(py::error_already_set& e) {  // GIL held
  std::string type = "Exception", message, tb;
  ErrorKind kind = ErrorKind::Python;
  try {
    type = py::str(e.type().attr("__name__"));
    message = py::str(e.value());
    for (auto& [cls, k] : api().errors) {
      if (PyObject_IsInstance(e.value().ptr(), cls.ptr()) == 1) {
        kind = k;
        break;
      }
    }
    py::object trace = e.trace() ? py::reinterpret_borrow<py::object>(e.trace()) : py::object(py::none());
    for (auto line : api().format_exception(e.type(), e.value(), trace)) tb += py::str(line).cast<std::string>();
  } catch (const std::exception& inner) {  // e.g. the rtrt package itself cannot be imported
    return Error(ErrorKind::Python, type, first_line(e.what()), inner.what());
  }
  if (kind == ErrorKind::Python) message = type + ": " + first_line(message);
  return Error(kind, type, message, tb);
}

// Runs f with the GIL and turns every Python (and pybind11 conversion) failure into rtrt::Error.
template <class F>
auto with_python(F&& f) -> decltype(f()) {
  ensure_python();
  py::gil_scoped_acquire gil;
  try {
    return f();
  } catch (py::error_already_set& e) {
    throw to_error(e);
  } catch (const py::cast_error& e) {
    throw Error(ErrorKind::Python, "CastError", std::string("unexpected result from the Python runtime: ") + e.what());
  } catch (const py::builtin_exception& e) {
    throw Error(ErrorKind::Python, "", first_line(e.what()));
  }
}

[[noreturn]] void image_error(const std::string& message) { throw Error(ErrorKind::Image, "ImageError", message); }

// A read-only HxWx3 numpy view of the caller's pixels; the size checks are the runtime's.
py::array image_view(const std::uint8_t* rgb, int width, int height, std::size_t stride) {  // GIL held
  if (width < 0 || height < 0)
    image_error("image size must not be negative, got " + std::to_string(width) + "x" + std::to_string(height));
  const std::size_t row = static_cast<std::size_t>(width) * 3;
  if (stride == 0) stride = row;
  if (stride < row)
    image_error("row stride of " + std::to_string(stride) + " bytes is less than width * 3 = " + std::to_string(row));
  if (rgb == nullptr && width > 0 && height > 0) image_error("image data is a null pointer");
  if (width == 0 || height == 0) rgb = nullptr;  // numpy allocates the empty array; the runtime names the problem
  py::object owner;  // a capsule that owns nothing: the buffer stays the caller's
  if (rgb) owner = py::capsule(rgb, [](void*) {});
  py::array view(py::dtype::of<std::uint8_t>(), {height, width, 3},
                 {static_cast<py::ssize_t>(stride), py::ssize_t{3}, py::ssize_t{1}}, rgb, owner);
  // Read-only, as PyArray_CLEARFLAGS does (the Python attribute route costs a few microseconds a call).
  py::detail::array_proxy(view.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return view;
}

// The runtime's coordinates are Python floats (doubles); float keeps a pixel position to well under 1/100 px.
template <std::size_t N>
std::array<float, N> to_coords(const py::handle& d, const char* field) {  // GIL held
  py::object v = d.attr(field);
  if (v.is_none())
    throw Error(ErrorKind::Python, "", "unexpected result from the Python runtime: detection " +
                                           d.attr("name").cast<std::string>() + " has no " + field);
  const auto xs = v.cast<std::vector<double>>();
  if (xs.size() != N)
    throw Error(ErrorKind::Python, "", std::string("unexpected result from the Python runtime: ") + field + " of " +
                                           std::to_string(xs.size()) + " numbers");
  std::array<float, N> out{};
  for (std::size_t i = 0; i < N; ++i) out[i] = static_cast<float>(xs[i]);
  return out;
}

std::vector<Detection> to_detections(const py::handle& list) {  // GIL held
  std::vector<Detection> out;
  for (auto d : list) {
    Detection x;
    x.name = d.attr("name").cast<std::string>();
    x.label = d.attr("label").cast<std::string>();
    x.score = d.attr("score").cast<double>();
    x.index = d.attr("index").cast<int>();
    x.box = to_coords<4>(d, "box");
    x.peak = to_coords<2>(d, "peak");
    out.push_back(std::move(x));
  }
  return out;
}

Image to_image(const py::object& pil) {  // GIL held
  py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast> a =
      py::module_::import("numpy").attr("asarray")(pil, "dtype"_a = "uint8");
  if (a.ndim() != 3 || a.shape(2) != 3) throw Error(ErrorKind::Python, "", "the runtime decoded an image that is not HxWx3");
  Image img;
  img.height = static_cast<int>(a.shape(0));
  img.width = static_cast<int>(a.shape(1));
  img.rgb.assign(a.data(), a.data() + a.size());
  return img;
}

}  // namespace

// ------------------------------------------------------------------ Pipeline
struct Pipeline::Impl {
  py::object pipe;  // rtrt.runtime.pipeline.Pipeline

  ~Impl() {
    if (!pipe) return;
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      pipe = py::object();
    } else {
      pipe.release();  // the host has finalised Python: the object is gone with it
    }
  }
};

Pipeline::Pipeline(const std::string& bundle_dir, const std::string& backend) : Pipeline(bundle_dir, [&] {
  Options o;
  o.backend = backend;
  return o;
}()) {}

Pipeline::Pipeline(const std::string& bundle_dir, const Options& o) : impl_(std::make_unique<Impl>()) {
  if (o.refine_every_token && o.refine_mask_z)
    throw Error(ErrorKind::Input, "", "Options: refine_mask_z and refine_every_token are both set; choose one");
  impl_->pipe = with_python([&] {
    return api().pipeline_cls.attr("from_bundle")(
        bundle_dir, "backend"_a = o.backend, "vlm"_a = o.vlm.empty() ? py::object(py::none()) : py::str(o.vlm),
        "load_vlm_model"_a = o.load_vlm, "device"_a = o.device, "max_new_tokens"_a = o.max_new_tokens,
        "on_engine_mismatch"_a = o.on_engine_mismatch, "precision"_a = o.precision,
        "threads"_a = o.threads == 0 ? py::object(py::none()) : py::object(py::int_(o.threads)),  // < 0: the runtime refuses it
        "verify"_a = o.verify,
        "vlm_backend"_a = o.vlm_backend.empty() ? py::object(py::none()) : py::object(py::str(o.vlm_backend)),
        "vlm_precision"_a = o.vlm_precision,
        "refine_mask_z"_a = o.refine_mask_z        ? py::object(py::float_(*o.refine_mask_z))
                            : o.refine_every_token ? py::object(py::none())
                                                   : py::object(py::str("bundle")),
        "refine_mask_classes"_a = o.refine_mask_classes.empty() ? std::string("bundle") : o.refine_mask_classes);
  });
}

Pipeline::~Pipeline() = default;
Pipeline::Pipeline(Pipeline&&) noexcept = default;
Pipeline& Pipeline::operator=(Pipeline&& other) noexcept {
  if (this != &other) impl_ = std::move(other.impl_);  // the old Impl takes the GIL to drop its object
  return *this;
}

static void check_loaded(bool loaded) {
  if (!loaded) throw Error(ErrorKind::Input, "", "this rtrt::Pipeline was moved from");
}

std::vector<Detection> Pipeline::detect(const std::uint8_t* rgb, int width, int height, std::size_t stride) const {
  check_loaded(impl_ != nullptr);
  return with_python([&] {
    py::object res = impl_->pipe.attr("detect")(image_view(rgb, width, height, stride));
    return to_detections(res.attr("detections"));
  });
}

std::vector<Detection> Pipeline::detect(const Image& image) const {
  return detect(image.rgb.data(), image.width, image.height);
}

static Answer call_answer(const py::object& pipe, const std::uint8_t* rgb, int width, int height,
                          const std::string* question, const AnswerOptions& o, std::size_t stride) {
  return with_python([&] {
    py::object q = question ? py::object(py::str(*question)) : py::object(py::none());
    py::object n = o.max_new_tokens > 0 ? py::object(py::int_(o.max_new_tokens)) : py::object(py::none());
    py::object region = py::none();
    if (o.region) {
      const auto& r = *o.region;
      region = py::make_tuple(r[0], r[1], r[2], r[3]);
    }
    py::object res = pipe(image_view(rgb, width, height, stride), q, "hints"_a = o.hints, "refine"_a = o.refine,
                          "max_new_tokens"_a = n, "region"_a = region);
    Answer a;
    a.answer = res.attr("answer").cast<std::string>();
    a.detections = to_detections(res.attr("detections"));
    a.hints = res.attr("hints").cast<std::vector<std::string>>();
    a.timings_ms = res.attr("timings_ms").cast<std::map<std::string, double>>();
    py::object got = res.attr("region");
    if (!got.is_none()) a.region = to_detections(py::make_tuple(got)).at(0);
    return a;
  });
}

Answer Pipeline::answer(const std::uint8_t* rgb, int width, int height, const std::string& question,
                        const AnswerOptions& options, std::size_t stride) const {
  check_loaded(impl_ != nullptr);
  return call_answer(impl_->pipe, rgb, width, height, &question, options, stride);
}

Answer Pipeline::answer(const std::uint8_t* rgb, int width, int height) const {
  check_loaded(impl_ != nullptr);
  return call_answer(impl_->pipe, rgb, width, height, nullptr, AnswerOptions{}, 0);
}

Answer Pipeline::answer(const Image& image, const std::string& question, const AnswerOptions& options) const {
  return answer(image.rgb.data(), image.width, image.height, question, options);
}

std::vector<std::string> Pipeline::class_names() const {
  check_loaded(impl_ != nullptr);
  return with_python([&] { return impl_->pipe.attr("class_names").cast<std::vector<std::string>>(); });
}

std::map<std::string, std::string> Pipeline::describe() const {
  check_loaded(impl_ != nullptr);
  return with_python([&] {
    std::map<std::string, std::string> out;
    for (auto item : impl_->pipe.attr("describe")().cast<py::dict>()) {
      std::string value;
      if (py::isinstance<py::list>(item.second) || py::isinstance<py::tuple>(item.second)) {
        for (auto x : item.second) value += (value.empty() ? "" : ",") + py::str(x).cast<std::string>();
      } else {
        value = py::str(item.second);
      }
      out[py::str(item.first)] = value;
    }
    return out;
  });
}

// ------------------------------------------------------------------ free functions
Image load_image(const std::string& path) {
  return with_python([&] { return to_image(api().load_image(path)); });
}

std::string default_bundle() {
  return with_python([] { return py::str(py::module_::import("rtrt.runtime.assets").attr("default_bundle")()).cast<std::string>(); });
}

std::string default_question() {
  return with_python([] { return api().default_question.cast<std::string>(); });
}

std::string region_question() {
  return with_python([] { return api().region_question.cast<std::string>(); });
}

std::string version() {
  return with_python([] { return py::module_::import("rtrt.runtime").attr("version")().cast<std::string>(); });
}

// ------------------------------------------------------------------ PPM / PGM (no Python)
namespace {
// Next header token of a netpbm file, skipping whitespace and # comments.
bool ppm_token(std::istream& in, std::string& tok) {
  tok.clear();
  int c;
  while ((c = in.get()) != EOF) {
    if (c == '#') {
      while ((c = in.get()) != EOF && c != '\n') {
      }
    } else if (!std::isspace(c)) {
      break;
    }
  }
  while (c != EOF && !std::isspace(c) && c != '#') {
    tok.push_back(static_cast<char>(c));
    if (tok.size() > 12) return false;
    c = in.get();
  }
  return !tok.empty();  // the single whitespace after maxval has been consumed
}

long ppm_number(std::istream& in, const std::string& path, const char* what) {
  std::string tok;
  if (!ppm_token(in, tok) || tok.find_first_not_of("0123456789") != std::string::npos)
    image_error(path + ": not a PPM/PGM file (bad " + what + ")");
  return std::stol(tok);
}
}  // namespace

Image read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) image_error(path + ": cannot open the file");
  std::string magic;
  if (!ppm_token(in, magic) || (magic != "P6" && magic != "P5"))
    image_error(path + ": not a binary PPM (P6) or PGM (P5) file");
  const long w = ppm_number(in, path, "width"), h = ppm_number(in, path, "height"),
             maxval = ppm_number(in, path, "maxval");
  if (w <= 0 || h <= 0) image_error(path + ": image is empty (" + std::to_string(w) + "x" + std::to_string(h) + ")");
  if (w > 100000 || h > 100000 || w * h > 40000000)
    image_error(path + ": image of " + std::to_string(w) + "x" + std::to_string(h) + " pixels exceeds the limit of 40000000");
  if (maxval < 1 || maxval > 65535) image_error(path + ": PPM maxval " + std::to_string(maxval) + " is outside 1..65535");
  const int channels = magic == "P6" ? 3 : 1, bytes = maxval > 255 ? 2 : 1;
  std::vector<unsigned char> raw(static_cast<std::size_t>(w * h * channels * bytes));
  if (!in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size())))
    image_error(path + ": truncated PPM/PGM data");
  Image img;
  img.width = static_cast<int>(w);
  img.height = static_cast<int>(h);
  img.rgb.resize(static_cast<std::size_t>(w * h * 3));
  const std::size_t n = static_cast<std::size_t>(w * h * channels);
  for (std::size_t i = 0; i < n; ++i) {
    long v = bytes == 2 ? (raw[2 * i] << 8 | raw[2 * i + 1]) : raw[i];
    if (v > maxval) v = maxval;
    const auto out = static_cast<std::uint8_t>(maxval == 255 ? v : (v * 255 + maxval / 2) / maxval);
    if (channels == 3) {
      img.rgb[i] = out;
    } else {
      img.rgb[3 * i] = img.rgb[3 * i + 1] = img.rgb[3 * i + 2] = out;
    }
  }
  return img;
}

}  // namespace rtrt
