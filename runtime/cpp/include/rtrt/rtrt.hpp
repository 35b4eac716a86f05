// rtrt C++ API: the rtrt runtime pipeline (detector + adapter + frozen VLM) for C++ perception stacks.
//
//     #include <rtrt/rtrt.hpp>
//     rtrt::Pipeline pipe("path/to/bundle", "ort");              // loads everything once
//     auto dets = pipe.detect(rgb, width, height);                // packed RGB8, row-major
//     rtrt::Answer a = pipe.answer(rgb, width, height, "Is the road blocked?");
//     // a.answer, a.detections[i].label / .score / .box, a.timings_ms["detector"]
//
// librtrt embeds the Python runtime (rtrt.runtime.pipeline.Pipeline), so a C++ call and
// `rtrt infer` run one implementation and give identical results. Errors the runtime raises
// (rtrt.runtime.errors.RtrtError) arrive as rtrt::Error with the same one-line message.
//
// Threads: every method may be called from several threads at once; each call takes Python's
// GIL for its Python part only (torch and onnxruntime release it while they compute). The
// embedded interpreter is started once per process, on first use, and is left running until the
// process exits; if the host process already runs Python, that interpreter is used.
//
// Which Python environment is embedded (first that applies): $RTRT_PYTHON (a python executable),
// $VIRTUAL_ENV (an activated venv of the same Python version), else the interpreter CMake was
// configured with (-DPython3_EXECUTABLE=...). PYTHONHOME and PYTHONPATH are honoured as by python.
// This header exposes no Python or pybind11 type.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_WIN32)
#define RTRT_API __declspec(dllexport)
#else
#define RTRT_API __attribute__((visibility("default")))
#endif

namespace rtrt {

// Which RtrtError subclass a Python exception was; Python means an unexpected Python exception
// (a bug or a broken installation), whose message is "TypeName: first line".
// Parity: Options::verify found a graph whose outputs differ from the bundle's reference here.
enum class ErrorKind { Bundle, Image, Input, ModelMismatch, EngineMismatch, EngineBuild, BackendUnavailable, Parity, Rtrt, Python };

// Everything rtrt throws. what() is one line, the message of the Python exception as is.
class RTRT_API Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& python_type, const std::string& message, std::string traceback = {});
  ErrorKind kind() const noexcept { return kind_; }
  // The Python class name, e.g. "BundleError" (empty for errors raised on the C++ side).
  const std::string& python_type() const noexcept { return python_type_; }
  // The formatted Python traceback, for logs; empty when there is none.
  const std::string& traceback() const noexcept { return traceback_; }

 private:
  ErrorKind kind_;
  std::string python_type_;
  std::string traceback_;
};

// One detected rare class and where it is (rtrt.runtime.modules.Detection). Coordinates are in
// the input image's pixels (x right, y down, origin at the top-left corner), as Python's doubles
// rounded to float; every detection of a Pipeline has them.
struct Detection {
  std::string name;             // class name as in the bundle ("traffic_cone")
  std::string label;            // the name as people read it ("traffic cone"), as `rtrt infer` prints it
  double score = 0;             // max cosine similarity over the image's patches, in [-1, 1]
  int index = -1;               // row of W (class index in the bundle)
  std::array<float, 4> box{};   // x0, y0, x1, y1: the region of the class's similarity map around its peak
  std::array<float, 2> peak{};  // x, y: centre of the patch where the class scored highest
};

// The answer to one (image, question).
struct Answer {
  std::string answer;                     // the VLM's greedy answer
  std::vector<Detection> detections;      // what the detector found, best first (also with hints off)
  std::vector<std::string> hints;         // class names put into the prompt (empty with hints off)
  std::map<std::string, double> timings_ms;  // per stage: image_decode, detector, vision_tower, adapter, prefill, decode, ...
  std::optional<Detection> region;        // a region question's box class (its box is the region; score: mean cosine
                                          // over the box; hinted when hints are on); empty: no region, or nothing stands out in it
};

// How a Pipeline is loaded: Pipeline.from_bundle's arguments, each passed through as is, so the
// runtime checks them and refuses what this machine cannot run (ErrorKind::BackendUnavailable,
// ErrorKind::Input) with the message `rtrt infer` prints.
struct Options {
  std::string backend = "ort";              // "ort", "trt" or "torch" (detector/adapter backend)
  std::string precision = "fp32";           // graphs' precision: "fp32", "fp16" (TensorRT, ORT's TensorRT EP) or "int8" (int8 graphs/engines)
  int threads = 0;                          // ONNX Runtime intra-op threads of the detector/adapter; 0: every core this process may use
  bool verify = false;                      // rerun the backend's graphs on the bundle's reference inputs first (ErrorKind::Parity)
  std::string vlm;                          // override the bundle's VLM (local directory or hub id; torch VLM backend); empty: the bundle's
  std::string vlm_backend;                  // "ort": the bundle's exported VLM on ONNX Runtime (no torch); "torch": transformers;
                                            // empty: ort when the bundle carries the exported VLM (rtrt export --vlm), else torch
  std::string vlm_precision = "fp32";       // exported VLM's decoder: "fp32" or "int8" (weight-only; ort VLM backend)
  std::string device = "cpu";               // device of the VLM, e.g. "cpu", "cuda:0"
  int max_new_tokens = 96;                  // default answer length limit in tokens
  bool load_vlm = true;                     // false: detector only (answer() then throws ErrorKind::Input)
  std::string on_engine_mismatch = "rebuild";  // cached TensorRT engine of another GPU/version: rebuild|fallback|fail
  std::optional<double> refine_mask_z;      // set: refine only the image-token cells where a class's calibrated detector
                                            // z-score exceeds it (Pipeline.refine_mask_z); empty: the bundle's own setting
                                            // (rtrt calibrate --refine-mask-z; the demo bundle's is 0)
  bool refine_every_token = false;          // true: every visual token refined (the paper), whatever the bundle says;
                                            // with refine_mask_z set too: ErrorKind::Input
  std::string refine_mask_classes;          // whose cells that mask keeps: "any", or the cells whose best class is "reported"
                                            // (one the detector reports) or "unhinted" (not named by the hint);
                                            // Pipeline.refine_mask_classes; empty: the bundle's own setting
};

// Per-call switches of answer(): the method's two remedies and the length limit.
struct AnswerOptions {
  bool hints = true;       // put detected class names into the prompt
  bool refine = true;      // refine the visual tokens with the adapter
  int max_new_tokens = 0;  // 0: the pipeline's default
  // Set: a region question about this box (x0, y0, x1, y1 in pixels of the image, which shows no box), as
  // Python's region=: the VLM sees the box drawn in red as CODA-LM draws it, the detector the image without
  // it, and the hint is the one class it finds in the box (Answer::region). Ask CODA-LM's region question
  // (region_question()) with it.
  std::optional<std::array<float, 4>> region;
};

// A decoded RGB8 image (row-major, packed, 3 bytes per pixel).
struct Image {
  int width = 0;
  int height = 0;
  std::vector<std::uint8_t> rgb;
};

// The detector + adapter + frozen VLM of one bundle, loaded once. Movable, not copyable.
// Images are packed RGB8 (HxWx3, row-major); stride_bytes is the distance between rows
// (0: width * 3). The buffer is only read during the call. Grayscale/alpha and all other
// checks are the runtime's: a bad image throws ErrorKind::Image with its message.
class RTRT_API Pipeline {
 public:
  Pipeline(const std::string& bundle_dir, const std::string& backend = "ort");
  Pipeline(const std::string& bundle_dir, const Options& options);
  ~Pipeline();
  Pipeline(Pipeline&&) noexcept;
  Pipeline& operator=(Pipeline&&) noexcept;
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // Detector only (no VLM call): the top-k classes above the bundle's threshold, best first.
  std::vector<Detection> detect(const std::uint8_t* rgb, int width, int height, std::size_t stride_bytes = 0) const;
  std::vector<Detection> detect(const Image& image) const;

  // Detect, put the names into the prompt, refine the visual tokens, answer greedily.
  // Without a question: CODA-LM's general-perception question (as `rtrt infer`).
  Answer answer(const std::uint8_t* rgb, int width, int height, const std::string& question,
                const AnswerOptions& options = {}, std::size_t stride_bytes = 0) const;
  Answer answer(const std::uint8_t* rgb, int width, int height) const;
  Answer answer(const Image& image, const std::string& question, const AnswerOptions& options = {}) const;

  // The bundle's class names, in the order of W (Detection::index indexes this).
  std::vector<std::string> class_names() const;
  // What is loaded and runs (Pipeline.describe()): bundle, backend, precision, providers (comma-
  // separated ONNX Runtime execution providers), device, classes, vlm, as strings.
  std::map<std::string, std::string> describe() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Decode an image file (PNG, JPEG, PPM, ...) exactly as `rtrt infer --image` does
// (the runtime's decoder: EXIF rotation, alpha flattened on black, 16-bit scaled).
RTRT_API Image load_image(const std::string& path);

// Read a binary PPM (P6) or PGM (P5) file natively, without Python; maxval 255 is read as is,
// other maxvals (up to 65535) are scaled to 0..255. Throws ErrorKind::Image on a bad file.
RTRT_API Image read_ppm(const std::string& path);

// The demo bundle shipped inside the Python package (the default of `rtrt infer --bundle`).
RTRT_API std::string default_bundle();

// CODA-LM's general-perception question, the default question of answer() and `rtrt infer`.
RTRT_API std::string default_question();

// CODA-LM's region question ("the object inside the red rectangle"), to ask with AnswerOptions::region.
RTRT_API std::string region_question();

// The version of the embedded rtrt Python package.
RTRT_API std::string version();

}  // namespace rtrt
