// ctest tests of the rtrt C++ API against the Python API's output on the same inputs.
//
//     rtrt_tests TEST FIXTURE_DIR
//     TEST: load | detect | answer | bad_image | tampered_bundle | threads | host_python | options | verify
//
// FIXTURE_DIR is written by tests/cpp/make_fixtures.py (ctest runs it first): a bundle, images as
// PNG and PPM, and expected.txt with what the Python API returned for them in another process.
// Detections (name, label, score, index, box, peak) and answers must be equal, not close: both
// sides run the same Python code; the C++ box and peak are Python's doubles rounded to float.
#include <rtrt/rtrt.hpp>

#include <pybind11/embed.h>  // host_python: a host that already runs Python; options: a look at the ORT sessions

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define CHECK(cond, msg)                                                                          \
  do {                                                                                            \
    if (!(cond)) {                                                                                \
      std::ostringstream os_;                                                                     \
      os_ << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed: " << msg;                 \
      throw Failure(os_.str());                                                                   \
    }                                                                                             \
  } while (0)

// ------------------------------------------------------------------ expected.txt
std::string unhex(const std::string& h) {
  if (h == "-") return "";
  std::string out;
  for (std::size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}

struct Case {
  std::string id;
  std::optional<std::string> question;
  rtrt::AnswerOptions options;
  std::string answer;
  std::vector<std::string> hints;
  std::vector<rtrt::Detection> detections;
  std::set<std::string> timing_keys;
  bool has_region = false;              // a region question: Python's Result.region below
  std::optional<rtrt::Detection> region;
};

struct ImageCase {
  std::string png, ppm;
  std::vector<rtrt::Detection> detections;
  std::vector<Case> cases;
};

// What Pipeline.from_bundle(demo bundle, "ort", precision=..., threads=...) detected on the first image.
struct PrecisionCase {
  std::string precision, providers;
  std::vector<rtrt::Detection> detections;
};

// Pipeline.from_bundle(bundle, verify=True): the error's Python type and message, empty when it loads.
struct VerifyCase {
  std::string bundle, python_type, message;
};

struct Expected {
  std::string dir, bundle, backend, empty_image, empty_question;
  std::vector<std::string> classes;
  std::vector<ImageCase> images;
  std::vector<std::pair<std::string, std::string>> bad_images, bad_bundles;  // path, message
  std::string demo_bundle, fp16_unavailable, bad_threads, mask_without_vlm;
  struct {
    std::string image, own, own_z, unrefined, every;  // answers: the bundle's setting (own_z: str() of it), z 1e6, every token
  } mask;
  int option_threads = 0;
  std::vector<PrecisionCase> precisions;
  std::vector<VerifyCase> verify;
};

// score index name label x0 y0 x1 y1 px py (floats as Python's repr: stod gives the same double).
rtrt::Detection parse_detection(std::istringstream& in) {
  std::string score, index, name, label;
  in >> score >> index >> name >> label;
  rtrt::Detection d;
  d.name = unhex(name);
  d.label = unhex(label);
  d.score = std::stod(score);
  d.index = std::stoi(index);
  std::string v;
  for (auto& x : d.box) in >> v, x = static_cast<float>(std::stod(v));
  for (auto& x : d.peak) in >> v, x = static_cast<float>(std::stod(v));
  if (!in) throw Failure("expected.txt: a detection record is incomplete");
  return d;
}

Expected read_expected(const std::string& dir) {
  std::ifstream f(dir + "/expected.txt");
  if (!f) throw Failure(dir + "/expected.txt missing: run tests/cpp/make_fixtures.py (ctest does)");
  Expected e;
  e.dir = dir;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream in(line);
    std::string key, a, b;
    in >> key;
    if (key == "bundle") {
      in >> a, e.bundle = unhex(a);
    } else if (key == "backend") {
      in >> a, e.backend = unhex(a);
    } else if (key == "class") {
      in >> a, e.classes.push_back(unhex(a));
    } else if (key == "image") {
      in >> a >> b, e.images.push_back({unhex(a), unhex(b), {}, {}});
    } else if (key == "detect") {
      e.images.back().detections.push_back(parse_detection(in));
    } else if (key == "case") {
      Case c;
      int hints, refine;
      in >> a >> b >> hints >> refine >> c.options.max_new_tokens;
      c.id = unhex(a);
      if (b != "*") c.question = unhex(b);
      c.options.hints = hints != 0;
      c.options.refine = refine != 0;
      e.images.back().cases.push_back(c);
    } else if (key == "cregion") {
      std::array<float, 4> box{};
      for (auto& x : box) in >> a, x = static_cast<float>(std::stod(a));
      e.images.back().cases.back().options.region = box;
    } else if (key == "aregion") {
      auto& c = e.images.back().cases.back();
      c.has_region = true;
      if (in.peek() == ' ') in.get();
      if (in.peek() == '-') c.region.reset();
      else c.region = parse_detection(in);
    } else if (key == "answer") {
      in >> a, e.images.back().cases.back().answer = unhex(a);
    } else if (key == "hint") {
      in >> a, e.images.back().cases.back().hints.push_back(unhex(a));
    } else if (key == "adetect") {
      e.images.back().cases.back().detections.push_back(parse_detection(in));
    } else if (key == "timings") {
      while (in >> a) e.images.back().cases.back().timing_keys.insert(unhex(a));
    } else if (key == "bad_image") {
      in >> a >> b, e.bad_images.emplace_back(unhex(a), unhex(b));
    } else if (key == "empty_image") {
      in >> a, e.empty_image = unhex(a);
    } else if (key == "empty_question") {
      in >> a, e.empty_question = unhex(a);
    } else if (key == "tampered") {
      in >> a >> b, e.bad_bundles.emplace_back(unhex(a), unhex(b));
    } else if (key == "demo") {
      in >> a >> e.option_threads, e.demo_bundle = unhex(a);
    } else if (key == "oprecision") {
      in >> a >> b, e.precisions.push_back({unhex(a), unhex(b), {}});
    } else if (key == "odetect") {
      e.precisions.back().detections.push_back(parse_detection(in));
    } else if (key == "ofp16") {
      in >> a, e.fp16_unavailable = unhex(a);
    } else if (key == "othreads") {
      in >> a, e.bad_threads = unhex(a);
    } else if (key == "omask") {
      std::string c, d, f, g;
      in >> a >> b >> c >> d >> f >> g;
      e.mask = {unhex(a), unhex(b), unhex(c), unhex(d), unhex(f)};
      e.mask_without_vlm = unhex(g);
    } else if (key == "verify") {
      std::string c;
      in >> a >> b >> c, e.verify.push_back({unhex(a), unhex(b), unhex(c)});
    }
  }
  CHECK(!e.images.empty() && !e.classes.empty(), "expected.txt is incomplete");
  return e;
}

// ------------------------------------------------------------------ comparisons
std::string show(const std::vector<rtrt::Detection>& d) {
  std::ostringstream os;
  os.precision(17);
  os << "[";
  for (const auto& x : d) {
    os << " " << x.name << "(" << x.label << ")#" << x.index << "=" << x.score << " box";
    for (float v : x.box) os << " " << v;
    os << " peak " << x.peak[0] << " " << x.peak[1] << ";";
  }
  return os.str() + " ]";
}

bool same(const std::vector<rtrt::Detection>& a, const std::vector<rtrt::Detection>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].name != b[i].name || a[i].label != b[i].label || a[i].index != b[i].index || a[i].score != b[i].score ||
        a[i].box != b[i].box || a[i].peak != b[i].peak)
      return false;
  return true;
}

void check_detections(const std::vector<rtrt::Detection>& got, const std::vector<rtrt::Detection>& want, const std::string& what) {
  CHECK(same(got, want), what << ": C++ " << show(got) << " != Python " << show(want));
}

rtrt::Answer ask(const rtrt::Pipeline& pipe, const rtrt::Image& img, const Case& c) {
  if (c.question) return pipe.answer(img.rgb.data(), img.width, img.height, *c.question, c.options);
  if (c.options.hints && c.options.refine && c.options.max_new_tokens == 0) return pipe.answer(img.rgb.data(), img.width, img.height);
  return pipe.answer(img, rtrt::default_question(), c.options);
}

void check_answer(const rtrt::Answer& got, const Case& want, const std::string& what) {
  CHECK(got.answer == want.answer, what << ": answer " << got.answer << " != Python's " << want.answer);
  CHECK(got.hints == want.hints, what << ": hints differ");
  check_detections(got.detections, want.detections, what + " detections");
  std::set<std::string> keys;
  for (const auto& kv : got.timings_ms) {
    keys.insert(kv.first);
    CHECK(kv.second >= 0, what << ": timing " << kv.first << " is negative");
  }
  CHECK(keys == want.timing_keys, what << ": timing stages differ");
  CHECK(got.region.has_value() == (want.has_region && want.region.has_value()), what << ": region presence differs");
  if (got.region) check_detections({*got.region}, {*want.region}, what + " region");
}

template <class F>
rtrt::Error expect_error(F&& f, const std::string& what) {
  try {
    f();
  } catch (const rtrt::Error& e) {
    CHECK(std::string(e.what()).find('\n') == std::string::npos, what << ": message is not one line: " << e.what());
    return e;
  }
  throw Failure(what + ": no rtrt::Error thrown");
}

// ------------------------------------------------------------------ tests
void test_load(const Expected& e) {
  rtrt::Pipeline pipe(e.bundle, e.backend);
  CHECK(pipe.class_names() == e.classes, "class names differ from the bundle's");
  auto info = pipe.describe();
  CHECK(info.count("bundle") && info.count("backend") && info["vlm"] != "None", "describe() incomplete");
  CHECK(!rtrt::version().empty() && !rtrt::default_question().empty(), "version/default question empty");
  rtrt::Pipeline moved = std::move(pipe);  // a moved Pipeline keeps working; the old one refuses
  CHECK(moved.class_names() == e.classes, "moved pipeline lost its state");
  auto err = expect_error([&] { pipe.class_names(); }, "moved-from pipeline");
  CHECK(err.kind() == rtrt::ErrorKind::Input, "moved-from pipeline: wrong kind");
  rtrt::Options detector_only;
  detector_only.backend = e.backend;
  detector_only.load_vlm = false;
  rtrt::Pipeline det(e.bundle, detector_only);
  const rtrt::Image img = rtrt::load_image(e.images[0].png);
  check_detections(det.detect(img), e.images[0].detections, "detector-only pipeline");
  err = expect_error([&] { det.answer(img.rgb.data(), img.width, img.height); }, "answer without a VLM");
  CHECK(err.kind() == rtrt::ErrorKind::Input && err.python_type() == "InputError", "answer without a VLM: wrong kind");
}

void test_detect(const Expected& e) {
  rtrt::Pipeline pipe(e.bundle, e.backend);
  for (const auto& ic : e.images) {
    const rtrt::Image png = rtrt::load_image(ic.png), ppm = rtrt::read_ppm(ic.ppm);
    CHECK(png.width == ppm.width && png.height == ppm.height && png.rgb == ppm.rgb, ic.ppm << ": PPM reader != runtime decoder");
    check_detections(pipe.detect(png), ic.detections, ic.png);
    check_detections(pipe.detect(ppm.rgb.data(), ppm.width, ppm.height), ic.detections, ic.ppm);
    // The same pixels inside a wider buffer (row stride > width * 3), as a camera driver may hand them.
    const std::size_t row = static_cast<std::size_t>(png.width) * 3, stride = row + 13;
    std::vector<std::uint8_t> padded(stride * png.height, 0xAB);
    for (int y = 0; y < png.height; ++y) std::copy_n(png.rgb.data() + y * row, row, padded.data() + y * stride);
    check_detections(pipe.detect(padded.data(), png.width, png.height, stride), ic.detections, ic.png + " strided");
  }
}

void test_answer(const Expected& e) {
  rtrt::Pipeline pipe(e.bundle, e.backend);
  int n = 0;
  for (const auto& ic : e.images) {
    const rtrt::Image img = rtrt::load_image(ic.png);
    for (const auto& c : ic.cases) check_answer(ask(pipe, img, c), c, ic.png + " case " + c.id), ++n;
  }
  int regions = 0;
  for (const auto& ic : e.images)
    for (const auto& c : ic.cases) regions += c.options.region.has_value();
  CHECK(regions > 0, "no region question among the cases");
  CHECK(rtrt::region_question().find("red rectangle") != std::string::npos, "region_question() is not CODA-LM's");
  std::cout << n << " answers equal the Python API's (" << regions << " region questions)\n";
}

void test_bad_image(const Expected& e) {
  for (const auto& [path, message] : e.bad_images) {
    auto err = expect_error([&] { rtrt::load_image(path); }, path);
    CHECK(err.kind() == rtrt::ErrorKind::Image && err.python_type() == "ImageError", path << ": wrong kind");
    CHECK(err.what() == message, path << ": message '" << err.what() << "' != Python's '" << message << "'");
  }
  rtrt::Options o;
  o.backend = e.backend;
  rtrt::Pipeline pipe(e.bundle, o);
  std::uint8_t px[12] = {};
  auto err = expect_error([&] { pipe.detect(px, 0, 0); }, "0x0 image");
  CHECK(err.kind() == rtrt::ErrorKind::Image && err.what() == e.empty_image, "0x0: '" << err.what() << "' != '" << e.empty_image << "'");
  err = expect_error([&] { pipe.answer(nullptr, 0, 0); }, "0x0 image in answer");
  CHECK(err.what() == e.empty_image, "0x0 in answer: " << err.what());
  CHECK(expect_error([&] { pipe.detect(nullptr, 2, 2); }, "null").kind() == rtrt::ErrorKind::Image, "null: wrong kind");
  CHECK(expect_error([&] { pipe.detect(px, -2, 2); }, "negative").kind() == rtrt::ErrorKind::Image, "negative: wrong kind");
  CHECK(expect_error([&] { pipe.detect(px, 2, 2, 5); }, "stride").kind() == rtrt::ErrorKind::Image, "stride: wrong kind");
  CHECK(expect_error([&] { pipe.detect(px, 100000, 100000); }, "huge").kind() == rtrt::ErrorKind::Image, "huge: wrong kind");
  const rtrt::Image img = rtrt::load_image(e.images[0].png);
  err = expect_error([&] { pipe.answer(img, ""); }, "empty question");
  CHECK(err.kind() == rtrt::ErrorKind::Input && err.what() == e.empty_question, "empty question: " << err.what());
  // The native PPM reader: not a PPM, truncated data.
  CHECK(expect_error([&] { rtrt::read_ppm(e.images[0].png); }, "PNG as PPM").kind() == rtrt::ErrorKind::Image, "PNG as PPM");
  const std::string cut = e.dir + "/truncated.ppm";
  {
    std::ifstream in(e.images[0].ppm, std::ios::binary);
    std::string data((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(cut, std::ios::binary) << data.substr(0, data.size() / 2);
  }
  CHECK(expect_error([&] { rtrt::read_ppm(cut); }, "truncated PPM").kind() == rtrt::ErrorKind::Image, "truncated PPM");
  CHECK(expect_error([&] { rtrt::read_ppm(e.dir + "/nope.ppm"); }, "missing PPM").kind() == rtrt::ErrorKind::Image, "missing");
  // The pipeline still works after all of that.
  check_detections(pipe.detect(img), e.images[0].detections, "after errors");
}

void test_tampered_bundle(const Expected& e) {
  CHECK(!e.bad_bundles.empty(), "no tampered bundle in the fixtures");
  for (const auto& [path, message] : e.bad_bundles) {
    auto err = expect_error([&] { rtrt::Pipeline p(path, e.backend); }, path);
    CHECK(err.kind() == rtrt::ErrorKind::Bundle && err.python_type() == "BundleError", path << ": kind " << err.python_type());
    CHECK(err.what() == message, path << ": message '" << err.what() << "' != Python's '" << message << "'");
  }
  auto err = expect_error([&] { rtrt::Pipeline p(e.bundle, "no_such_backend"); }, "unknown backend");
  CHECK(err.kind() != rtrt::ErrorKind::Python, "unknown backend is not an RtrtError: " << err.what());
}

void test_threads(const Expected& e) {
  rtrt::Pipeline pipe(e.bundle, e.backend);
  std::vector<rtrt::Image> imgs;
  for (const auto& ic : e.images) imgs.push_back(rtrt::load_image(ic.png));
  const Case& c = e.images[0].cases.at(1);  // a question with hints and refinement
  std::vector<std::vector<rtrt::Detection>> serial_det;
  std::vector<rtrt::Answer> serial_ans;
  for (const auto& img : imgs) serial_det.push_back(pipe.detect(img)), serial_ans.push_back(ask(pipe, img, c));
  for (std::size_t i = 0; i < imgs.size(); ++i) {
    check_detections(serial_det[i], e.images[i].detections, "serial detect");
    CHECK(serial_ans[i].answer == e.images[i].cases.at(1).answer, "serial answer differs from Python's");
  }
  constexpr int kThreads = 4, kRounds = 3;
  std::vector<std::string> errors(kThreads);
  std::atomic<int> calls{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t) {
    pool.emplace_back([&, t] {
      try {
        for (int r = 0; r < kRounds; ++r) {
          const std::size_t i = static_cast<std::size_t>(t + r) % imgs.size();
          CHECK(same(pipe.detect(imgs[i]), serial_det[i]), "thread " << t << ": detect differs");
          const rtrt::Answer a = ask(pipe, imgs[i], c);
          CHECK(a.answer == serial_ans[i].answer && same(a.detections, serial_ans[i].detections) && a.hints == serial_ans[i].hints,
                "thread " << t << ": answer differs: " << a.answer);
          calls += 2;
        }
      } catch (const std::exception& ex) {
        errors[t] = ex.what();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (const auto& err : errors) CHECK(err.empty(), err);
  std::cout << calls << " concurrent calls from " << kThreads << " threads equal the serial results\n";
}

// Options reach Pipeline.from_bundle: precision picks the graphs, threads the ONNX Runtime sessions,
// and what this machine cannot run is refused with the runtime's one-line message.
void test_options(const Expected& e) {
  CHECK(e.precisions.size() == 2 && !e.demo_bundle.empty(), "expected.txt has no Options records");
  CHECK(e.demo_bundle == rtrt::default_bundle(), "the fixtures' demo bundle is not rtrt::default_bundle()");
  const rtrt::Image img = rtrt::load_image(e.images[0].png);
  std::vector<std::vector<rtrt::Detection>> got;
  for (const auto& pc : e.precisions) {
    rtrt::Options o;
    o.precision = pc.precision;
    o.threads = e.option_threads;
    o.load_vlm = false;
    rtrt::Pipeline pipe(e.demo_bundle, o);
    auto info = pipe.describe();
    CHECK(info["precision"] == pc.precision && info["providers"] == pc.providers,
          pc.precision << ": describe() says " << info["precision"] << " on " << info["providers"]);
    got.push_back(pipe.detect(img));
    CHECK(!pc.detections.empty(), pc.precision << ": the demo bundle detects nothing on " << e.images[0].png);
    check_detections(got.back(), pc.detections, "precision " + pc.precision);
  }
  // int8 ran the int8 graphs: same classes and places here, other scores (fp32 and int8 differ in the last bits).
  CHECK(!same(got[0], got[1]), "fp32 and int8 detections are identical: the int8 graphs did not run");

  rtrt::Options fp16;
  fp16.precision = "fp16";
  fp16.load_vlm = false;
  auto err = expect_error([&] { rtrt::Pipeline p(e.demo_bundle, fp16); }, "fp16 on ORT CPU");
  CHECK(err.kind() == rtrt::ErrorKind::BackendUnavailable && err.what() == e.fp16_unavailable,
        "fp16: '" << err.what() << "' != Python's '" << e.fp16_unavailable << "'");
  rtrt::Options bad_threads;
  bad_threads.threads = -1;
  bad_threads.load_vlm = false;
  err = expect_error([&] { rtrt::Pipeline p(e.demo_bundle, bad_threads); }, "threads -1");
  CHECK(err.kind() == rtrt::ErrorKind::Input && err.what() == e.bad_threads, "threads -1: " << err.what());
  // refine_mask_z reaches the runtime: the bundle's own setting by default, another z, or every token
  // refined (refine_every_token), each answer Python's; both set, or a z without a VLM, refused.
  CHECK(!e.mask.image.empty() && e.mask.unrefined != e.mask.every, "expected.txt has no usable omask record");
  const rtrt::Image mimg = rtrt::load_image(e.mask.image);
  {
    rtrt::Pipeline pipe(e.demo_bundle);
    CHECK(pipe.describe()["refine_mask_z"] == e.mask.own_z, "describe() says refine_mask_z " << pipe.describe()["refine_mask_z"]
          << ", Python " << e.mask.own_z);
    const std::string got = pipe.answer(mimg.rgb.data(), mimg.width, mimg.height).answer;
    CHECK(got == e.mask.own, "the bundle's refinement: '" << got << "' != Python's '" << e.mask.own << "'");
  }
  rtrt::Options masked;
  masked.refine_mask_z = 1e6;
  {
    rtrt::Pipeline pipe(e.demo_bundle, masked);
    const std::string got = pipe.answer(mimg.rgb.data(), mimg.width, mimg.height).answer;
    CHECK(got == e.mask.unrefined, "refine_mask_z 1e6: '" << got << "' != Python's '" << e.mask.unrefined << "'");
  }
  rtrt::Options every;
  every.refine_every_token = true;
  {
    rtrt::Pipeline pipe(e.demo_bundle, every);
    CHECK(pipe.describe()["refine_mask_z"] == "None", "refine_every_token: describe() says " << pipe.describe()["refine_mask_z"]);
    const std::string got = pipe.answer(mimg.rgb.data(), mimg.width, mimg.height).answer;
    CHECK(got == e.mask.every, "refine_every_token: '" << got << "' != Python's '" << e.mask.every << "'");
  }
  every.refine_mask_z = 0.0;
  err = expect_error([&] { rtrt::Pipeline p(e.demo_bundle, every); }, "refine_mask_z with refine_every_token");
  CHECK(err.kind() == rtrt::ErrorKind::Input, "both mask options: " << err.what());
  masked.load_vlm = false;
  err = expect_error([&] { rtrt::Pipeline p(e.demo_bundle, masked); }, "refine_mask_z without a VLM");
  CHECK(err.kind() == rtrt::ErrorKind::ModelMismatch && err.what() == e.mask_without_vlm, "refine_mask_z: " << err.what());
  // refine_mask_classes reaches the runtime: the bundle's own setting when empty, "any" or "reported" when set,
  // another value refused as Python refuses it.
  {
    rtrt::Options classes;
    classes.load_vlm = false;
    const std::string own = rtrt::Pipeline(e.demo_bundle, classes).describe()["refine_mask_classes"];
    CHECK(own == "any" || own == "reported" || own == "unhinted", "the bundle's refine_mask_classes: describe() says " << own);
    for (const std::string v : {"any", "reported", "unhinted"}) {
      classes.refine_mask_classes = v;
      const std::string got = rtrt::Pipeline(e.demo_bundle, classes).describe()["refine_mask_classes"];
      CHECK(got == v, "refine_mask_classes " << v << ": describe() says " << got);
    }
    classes.refine_mask_classes = "all";
    err = expect_error([&] { rtrt::Pipeline p(e.demo_bundle, classes); }, "refine_mask_classes all");
    CHECK(err.kind() == rtrt::ErrorKind::Input && std::string(err.what()).find("refine_mask_classes must be one of any, reported, unhinted") != std::string::npos,
          "refine_mask_classes all: " << err.what());
  }

  // The thread count arrives in ONNX Runtime: the one live Python Pipeline's sessions use it.
  rtrt::Options three;
  three.threads = 3;
  three.load_vlm = false;
  rtrt::Pipeline pipe(e.demo_bundle, three);
  namespace py = pybind11;
  py::gil_scoped_acquire gil;
  py::object cls = py::module_::import("rtrt.runtime.pipeline").attr("Pipeline");
  py::module_ gc = py::module_::import("gc");
  gc.attr("collect")();  // the pipelines above are gone, cycles included
  std::vector<py::object> live;
  for (auto o : gc.attr("get_objects")())
    if (py::isinstance(o, cls)) live.push_back(py::reinterpret_borrow<py::object>(o));
  CHECK(live.size() == 1, live.size() << " Python pipelines alive, want the one of this rtrt::Pipeline");
  int sessions = 0;
  for (auto kv : live[0].attr("backend").attr("sessions").cast<py::dict>()) {
    const int n = kv.second.attr("get_session_options")().attr("intra_op_num_threads").cast<int>();
    CHECK(n == 3, py::str(kv.first).cast<std::string>() << " session runs " << n << " threads, not 3");
    ++sessions;
  }
  CHECK(sessions == 2, "want the detector and adapter sessions, got " << sessions);
}

// Options::verify reruns the graphs on the bundle's reference data before anything else is loaded.
void test_verify(const Expected& e) {
  CHECK(!e.verify.empty(), "expected.txt has no verify records");
  for (const auto& vc : e.verify) {
    rtrt::Options o;
    o.backend = e.backend;
    o.load_vlm = false;
    rtrt::Pipeline plain(vc.bundle, o);  // without verify nothing is rerun: every one of them loads
    o.verify = true;
    if (vc.message.empty()) {
      rtrt::Pipeline checked(vc.bundle, o);
      CHECK(checked.class_names() == e.classes, vc.bundle << ": verified pipeline has other classes");
      continue;
    }
    auto err = expect_error([&] { rtrt::Pipeline p(vc.bundle, o); }, vc.bundle + " with verify");
    CHECK(err.python_type() == vc.python_type && err.what() == vc.message,
          vc.bundle << ": " << err.python_type() << " '" << err.what() << "' != Python's " << vc.python_type << " '" << vc.message << "'");
    if (vc.python_type == "ParityError") CHECK(err.kind() == rtrt::ErrorKind::Parity, vc.bundle << ": wrong kind");
  }
}

// A host that runs Python itself (its own interpreter, its own venv) and then uses librtrt.
void test_host_python(const Expected& e) {
  namespace py = pybind11;
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.parse_argv = 0;
  if (const char* exe = std::getenv("RTRT_PYTHON")) PyConfig_SetBytesString(&config, &config.program_name, exe);
  py::initialize_interpreter(&config, 0, nullptr, false);
  py::module_::import("sys").attr("host_marker") = 42;  // librtrt must see this very interpreter
  {
    rtrt::Pipeline pipe(e.bundle, e.backend);  // called while this thread holds the GIL
    const rtrt::Image img = rtrt::load_image(e.images[0].png);
    check_detections(pipe.detect(img), e.images[0].detections, "host holding the GIL");
    CHECK(py::module_::import("sys").attr("modules").contains("rtrt.runtime.pipeline"), "librtrt used another interpreter");
    py::gil_scoped_release release;  // the host lets other threads in
    std::vector<std::vector<rtrt::Detection>> got(2);
    std::thread t0([&] { got[0] = pipe.detect(img); }), t1([&] { got[1] = pipe.detect(img); });
    t0.join(), t1.join();
    for (const auto& g : got) check_detections(g, e.images[0].detections, "host threads");
  }
  std::cout << "librtrt shared the host's interpreter\n";
  // Not finalised: torch does not survive Py_Finalize; a real host would not finalise either.
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: rtrt_tests TEST FIXTURE_DIR\n";
    return 2;
  }
  const std::string test = argv[1];
  const std::vector<std::pair<std::string, std::function<void(const Expected&)>>> tests = {
      {"load", test_load},           {"detect", test_detect},
      {"answer", test_answer},       {"bad_image", test_bad_image},
      {"tampered_bundle", test_tampered_bundle}, {"threads", test_threads},
      {"host_python", test_host_python},         {"options", test_options},
      {"verify", test_verify},
  };
  for (const auto& [name, fn] : tests) {
    if (name != test) continue;
    try {
      fn(read_expected(argv[2]));
      std::cout << "PASS " << name << "\n";
      return 0;
    } catch (const rtrt::Error& ex) {
      std::cerr << "FAIL " << name << ": unexpected rtrt::Error: " << ex.what() << "\n" << ex.traceback() << "\n";
    } catch (const std::exception& ex) {
      std::cerr << "FAIL " << name << ": " << ex.what() << "\n";
    }
    return 1;
  }
  std::cerr << "unknown test " << test << "\n";
  return 2;
}
