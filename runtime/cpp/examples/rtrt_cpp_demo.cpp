// rtrt_cpp_demo: answer a question about one image through the rtrt C++ API (like `rtrt infer`).
//
//     rtrt_cpp_demo IMAGE [BUNDLE] [--question Q] [--backend ort|trt|torch] [--precision fp32|fp16|int8]
//                   [--threads N] [--verify] [--vlm REF] [--vlm-backend ort|torch] [--vlm-precision fp32|int8]
//                   [--device cpu|cuda:0] [--max-new-tokens N]
//                   [--no-hints] [--no-refine] [--refine-mask-z Z|off|bundle] [--refine-mask-classes any|reported|unhinted|bundle]
//                   [--region X0,Y0,X1,Y1]
//
// IMAGE: a PPM/PGM (read here, natively, as a camera driver would hand over pixels) or any
// other format (PNG, JPEG, ...; decoded by the runtime exactly as `rtrt infer` does).
// BUNDLE defaults to the demo bundle shipped with the Python package.
// Exit codes: 0 answered, 2 an rtrt::Error (one line on stderr), 1 anything else.
#include <rtrt/rtrt.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

namespace {

const char* kUsage =
    "usage: rtrt_cpp_demo IMAGE [BUNDLE] [--question Q] [--backend ort|trt|torch] [--precision fp32|fp16|int8]\n"
    "                     [--threads N] [--verify] [--vlm REF] [--vlm-backend ort|torch] [--vlm-precision fp32|int8]\n"
    "                     [--device DEV] [--max-new-tokens N]\n"
    "                     [--no-hints] [--no-refine] [--refine-mask-z Z|off|bundle] [--refine-mask-classes any|reported|unhinted|bundle]\n"
    "                     [--region X0,Y0,X1,Y1]\n";

// The whole argument must be a number ("3x" is refused, not read as 3).
int to_int(const std::string& flag, const std::string& v) {
  try {
    std::size_t used = 0;
    const int n = std::stoi(v, &used);
    if (used == v.size()) return n;
  } catch (const std::exception&) {
  }
  std::cerr << "rtrt_cpp_demo: error: " << flag << " must be an integer, got " << v << "\n";
  std::exit(2);
}

// A finite number, the whole argument ("0x" is refused).
double to_double(const std::string& flag, const std::string& v) {
  try {
    std::size_t used = 0;
    const double x = std::stod(v, &used);
    if (used == v.size() && std::isfinite(x)) return x;
  } catch (const std::exception&) {
  }
  std::cerr << "rtrt_cpp_demo: error: " << flag << " must be a finite number, off or bundle, got " << v << "\n";
  std::exit(2);
}

// --region X0,Y0,X1,Y1: four finite numbers (the runtime checks the box against the image).
std::array<float, 4> to_box(const std::string& v) {
  std::vector<std::string> parts(1);
  for (char c : v) {
    if (c == ',') parts.emplace_back();
    else parts.back().push_back(c);
  }
  std::array<float, 4> box{};
  bool ok = parts.size() == 4;
  for (std::size_t k = 0; ok && k < 4; ++k) {
    try {
      std::size_t used = 0;
      const double x = std::stod(parts[k], &used);
      ok = used == parts[k].size() && std::isfinite(x);
      box[k] = static_cast<float>(x);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  if (!ok) {
    std::cerr << "rtrt_cpp_demo: error: --region must be X0,Y0,X1,Y1 (four numbers, pixels), got " << v << "\n";
    std::exit(2);
  }
  return box;
}

std::string lower_ext(const std::string& path) {
  const auto dot = path.rfind('.');
  std::string ext = dot == std::string::npos ? "" : path.substr(dot + 1);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string question;
  bool has_question = false;
  rtrt::Options options;
  rtrt::AnswerOptions call;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "rtrt_cpp_demo: error: " << flag << " needs a value\n" << kUsage;
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--question") {
      question = value("--question");
      has_question = true;
    } else if (a == "--backend") {
      options.backend = value("--backend");
    } else if (a == "--precision") {
      options.precision = value("--precision");
    } else if (a == "--vlm-backend") {
      options.vlm_backend = value("--vlm-backend");
    } else if (a == "--vlm-precision") {
      options.vlm_precision = value("--vlm-precision");
    } else if (a == "--threads") {
      options.threads = to_int("--threads", value("--threads"));
    } else if (a == "--verify") {
      options.verify = true;
    } else if (a == "--vlm") {
      options.vlm = value("--vlm");
    } else if (a == "--device") {
      options.device = value("--device");
    } else if (a == "--max-new-tokens") {
      options.max_new_tokens = to_int("--max-new-tokens", value("--max-new-tokens"));
    } else if (a == "--no-hints") {
      call.hints = false;
    } else if (a == "--no-refine") {
      call.refine = false;
    } else if (a == "--refine-mask-z") {  // as rtrt infer: the bundle's setting unless told otherwise
      const std::string v = value("--refine-mask-z");
      options.refine_mask_z.reset();
      options.refine_every_token = v == "off";
      if (v != "off" && v != "bundle") options.refine_mask_z = to_double("--refine-mask-z", v);
    } else if (a == "--refine-mask-classes") {  // as rtrt infer: the bundle's setting unless told otherwise
      const std::string v = value("--refine-mask-classes");
      options.refine_mask_classes = v == "bundle" ? std::string() : v;  // another value: the runtime's one-line error
    } else if (a == "--region") {  // as rtrt infer --region: CODA-LM's region question about this box
      call.region = to_box(value("--region"));
    } else if (a.rfind("--", 0) == 0) {
      std::cerr << "rtrt_cpp_demo: error: unknown option " << a << "\n" << kUsage;
      return 2;
    } else {
      positional.push_back(a);
    }
  }
  if (positional.empty() || positional.size() > 2) {
    std::cerr << kUsage;
    return 2;
  }
  try {
    const std::string& image_path = positional[0];
    const std::string ext = lower_ext(image_path);
    // Fail fast on a bad image, before loading any model (as rtrt infer).
    const rtrt::Image image =
        (ext == "ppm" || ext == "pgm" || ext == "pnm") ? rtrt::read_ppm(image_path) : rtrt::load_image(image_path);
    const std::string bundle = positional.size() > 1 ? positional[1] : rtrt::default_bundle();

    rtrt::Pipeline pipe(bundle, options);
    const std::string q = has_question ? question : call.region ? rtrt::region_question() : rtrt::default_question();
    const rtrt::Answer res = pipe.answer(image, q, call);

    std::cout << res.answer << "\n\n";
    if (res.detections.empty()) {
      std::cout << "rare objects: none above threshold\n";
    } else {
      // One per line: label, score, box [x0, y0, x1, y1] and peak (x, y) in the image's pixels.
      std::cout << "rare objects:\n";
      for (const auto& d : res.detections) {
        char where[128];
        std::snprintf(where, sizeof where, "%.2f  box [%.0f, %.0f, %.0f, %.0f]  peak (%.0f, %.0f)", d.score, d.box[0],
                      d.box[1], d.box[2], d.box[3], d.peak[0], d.peak[1]);
        std::cout << "  " << std::left << std::setw(16) << d.label << " " << where << "\n";
      }
    }
    if (res.region) {
      const auto& r = *res.region;
      char where[160];
      std::snprintf(where, sizeof where, "in the region [%.0f, %.0f, %.0f, %.0f]: %s (%.2f)\n", r.box[0], r.box[1], r.box[2],
                    r.box[3], r.label.c_str(), r.score);
      std::cout << where;
    }
    // Stages in pipeline order (as rtrt infer prints them), then any others.
    std::vector<std::string> order = {"image_decode", "detector", "prompt_build", "vision_tower", "adapter",
                                      "prefill", "decode_per_token", "decode", "vlm_total"};
    for (const auto& kv : res.timings_ms)
      if (std::find(order.begin(), order.end(), kv.first) == order.end()) order.push_back(kv.first);
    std::cout << "timings (ms):";
    const char* sep = " ";
    for (const auto& stage : order) {
      const auto it = res.timings_ms.find(stage);
      if (it == res.timings_ms.end()) continue;
      char v[32];
      std::snprintf(v, sizeof v, "%.1f", it->second);
      std::cout << sep << stage << " " << v;
      sep = ", ";
    }
    std::cout << "\n";
    return 0;
  } catch (const rtrt::Error& e) {
    std::cerr << "rtrt_cpp_demo: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "rtrt_cpp_demo: unexpected error: " << e.what() << "\n";
    return 1;
  }
}
