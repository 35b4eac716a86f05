// The C++ API's overhead against the same call made from Python, measured side by side.
//
//     bench_cpp BUNDLE IMAGE [--backend B] [--rounds N] [--answer-rounds N] [--max-new-tokens N]
//
// One process, one embedded interpreter, two pipelines loaded from the same bundle: an
// rtrt::Pipeline and a Python rtrt.runtime.pipeline.Pipeline. Each round times one C++ call
// (raw RGB pointer in, std::vector out) and then the same call from Python (numpy array in, timed
// with time.perf_counter around the call in Python), so drift and noise hit both alike. Prints, for
// detect() and answer(), the medians, their ratio (overhead = ratio - 1) and the median of the
// per-round differences (the absolute cost of the C++ layer: GIL, numpy view, result conversion).
#include <rtrt/rtrt.hpp>

#include <pybind11/embed.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Stat {
  std::vector<double> cpp_ms, py_ms;
  void report(const char* what) const {
    const double c = median(cpp_ms), p = median(py_ms);
    std::vector<double> diff;  // paired by round: drift of a shared machine cancels out
    for (std::size_t i = 0; i < cpp_ms.size(); ++i) diff.push_back(cpp_ms[i] - py_ms[i]);
    std::printf("%-7s rounds %4zu  C++ median %9.3f ms  Python median %9.3f ms  ratio %.4f (overhead %+6.2f %%)  "
                "paired median difference %+8.1f us\n",
                what, cpp_ms.size(), c, p, c / p, 100.0 * (c / p - 1.0), 1e3 * median(diff));
  }
};

const char* kPyTimer = R"(
import time
def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - t0) * 1e3
)";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: bench_cpp BUNDLE IMAGE [--backend B] [--rounds N] [--answer-rounds N] [--max-new-tokens N]\n";
    return 2;
  }
  const std::string bundle = argv[1], image_path = argv[2];
  std::string backend = "ort";
  int rounds = 200, answer_rounds = 20, max_new_tokens = 16;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--backend") backend = value;
    else if (flag == "--rounds") rounds = std::stoi(value);
    else if (flag == "--answer-rounds") answer_rounds = std::stoi(value);
    else if (flag == "--max-new-tokens") max_new_tokens = std::stoi(value);
  }
  try {
    const rtrt::Image img = rtrt::load_image(image_path);  // starts the interpreter
    rtrt::Options opt;
    opt.backend = backend;
    opt.max_new_tokens = max_new_tokens;
    rtrt::Pipeline cpp(bundle, opt);
    const std::string question = "What is on the road?";
    rtrt::AnswerOptions call;

    py::object py_pipe, arr, timed;
    {
      py::gil_scoped_acquire gil;
      py_pipe = py::module_::import("rtrt.runtime.pipeline").attr("Pipeline").attr("from_bundle")(
          bundle, "backend"_a = backend, "max_new_tokens"_a = max_new_tokens);
      arr = py::array_t<std::uint8_t>({img.height, img.width, 3}, img.rgb.data());  // what a Python caller holds
      py::dict ns;
      py::exec(kPyTimer, ns);
      timed = ns["timed"];
    }
    auto cpp_ms = [](auto&& fn) {
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    };
    auto py_ms = [&](const char* method, bool answer) {
      py::gil_scoped_acquire gil;
      return answer ? timed(py_pipe, arr, question).cast<double>() : timed(py_pipe.attr(method), arr).cast<double>();
    };

    // Warm-up (first calls allocate and, for onnxruntime, plan) and a parity check.
    for (int i = 0; i < 3; ++i) cpp.detect(img), py_ms("detect", false);
    const rtrt::Answer a = cpp.answer(img, question, call);
    std::string py_answer;
    {
      py::gil_scoped_acquire gil;
      py_answer = py_pipe(arr, question).attr("answer").cast<std::string>();
    }
    if (a.answer != py_answer) {
      std::cerr << "bench_cpp: C++ and Python answers differ\n";
      return 1;
    }

    Stat det, ans;
    // Alternate which side goes first, so neither always finds warm caches.
    for (int r = 0; r < rounds; ++r) {
      if (r % 2) det.py_ms.push_back(py_ms("detect", false));
      det.cpp_ms.push_back(cpp_ms([&] { cpp.detect(img.rgb.data(), img.width, img.height); }));
      if (!(r % 2)) det.py_ms.push_back(py_ms("detect", false));
    }
    for (int r = 0; r < answer_rounds; ++r) {
      if (r % 2) ans.py_ms.push_back(py_ms(nullptr, true));
      ans.cpp_ms.push_back(cpp_ms([&] { cpp.answer(img.rgb.data(), img.width, img.height, question, call); }));
      if (!(r % 2)) ans.py_ms.push_back(py_ms(nullptr, true));
    }
    std::printf("bench_cpp: bundle %s, backend %s, image %dx%d, answers of up to %d tokens\n", bundle.c_str(),
                backend.c_str(), img.width, img.height, max_new_tokens);
    det.report("detect");
    ans.report("answer");
    {
      py::gil_scoped_acquire gil;  // drop the Python objects under the GIL
      py_pipe = py::object(), arr = py::object(), timed = py::object();
    }
    return 0;
  } catch (const rtrt::Error& e) {
    std::cerr << "bench_cpp: error: " << e.what() << "\n";
    return 2;
  }
}
