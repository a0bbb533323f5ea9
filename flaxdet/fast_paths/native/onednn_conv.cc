// flaxdet fast path `onednn_conv`: a forward 2-D convolution (groups 1) by oneDNN, called from XLA:CPU through
// the XLA FFI (jax.ffi.ffi_call; see flaxdet/fast_paths/onednn.py).
//
//   x (N, H, W, C) NHWC, w (KH, KW, C, O) HWIO, both float32 or both bfloat16 -> y (N, OH, OW, O) float32.
//   Attributes: strides sh, sw; paddings top, bottom, left, right (>= 0); dilations dh, dw (1 = none).
//
// The primitive for each shape is created once and cached (oneDNN picks the weights' blocked layout; the HWIO
// weights are reordered into it on every call: cheap next to the convolution). Calls may run concurrently (XLA:CPU
// runs independent operations on several threads): each has its own scratchpad and weights buffer. Built by `make native` against
// the system's oneDNN (Debian: libdnnl-dev), with the XLA FFI headers that jaxlib ships (jax.ffi.include_dir()).
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl_dt = dnnl::memory::data_type;
using dnnl_tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Primitive {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward conv;
  dnnl::memory::desc user_weights;
  bool reorder_weights = false;
  dnnl::reorder::primitive_desc reorder_pd;
  dnnl::reorder reorder;
};

// XLA:CPU may run independent operations at once on its threads, so two calls can execute primitives
// concurrently: each call brings its own scratchpad (oneDNN's default shares one library scratchpad between
// primitives, which is not safe then).
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

std::mutex cache_mutex;
std::map<std::vector<int64_t>, std::shared_ptr<Primitive>> cache;

std::shared_ptr<Primitive> GetPrimitive(dnnl_dt in_type, const std::vector<int64_t>& key) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  // key: type, N, H, W, C, KH, KW, O, OH, OW, sh, sw, top, bottom, left, right, dh, dw
  const int64_t n = key[1], h = key[2], w = key[3], c = key[4], kh = key[5], kw = key[6], o = key[7];
  const int64_t oh = key[8], ow = key[9];
  dnnl::memory::desc src({n, c, h, w}, in_type, dnnl_tag::nhwc);
  dnnl::memory::desc dst({n, o, oh, ow}, dnnl_dt::f32, dnnl_tag::nhwc);
  dnnl::memory::desc any_weights({o, c, kh, kw}, in_type, dnnl_tag::any);
  dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
                                       src, any_weights, dst, {key[10], key[11]}, {key[16] - 1, key[17] - 1},
                                       {key[12], key[14]}, {key[13], key[15]});
  auto prim = std::make_shared<Primitive>();
  prim->pd = dnnl::convolution_forward::primitive_desc(desc, UserScratchpad(), Engine());
  prim->conv = dnnl::convolution_forward(prim->pd);
  prim->user_weights = dnnl::memory::desc({o, c, kh, kw}, in_type, dnnl_tag::hwio);
  prim->reorder_weights = prim->pd.weights_desc() != prim->user_weights;
  if (prim->reorder_weights) {
    prim->reorder_pd = dnnl::reorder::primitive_desc(Engine(), prim->user_weights, Engine(), prim->pd.weights_desc(),
                                                     UserScratchpad());
    prim->reorder = dnnl::reorder(prim->reorder_pd);
  }
  cache.emplace(key, prim);
  return prim;
}

template <ffi::DataType T>
ffi::Error Conv(ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                int64_t top, int64_t bottom, int64_t left, int64_t right, int64_t dh, int64_t dw) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("onednn_conv: x, w and y must have rank 4 (NHWC, HWIO, NHWC)");
  }
  if (wd[2] != xd[3] || yd[0] != xd[0] || yd[3] != wd[3]) {
    return ffi::Error::InvalidArgument("onednn_conv: shapes do not match (groups must be 1)");
  }
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || top < 0 || bottom < 0 || left < 0 || right < 0) {
    return ffi::Error::InvalidArgument("onednn_conv: strides and dilations >= 1, paddings >= 0");
  }
  const dnnl_dt in_type = T == ffi::DataType::BF16 ? dnnl_dt::bf16 : dnnl_dt::f32;
  std::vector<int64_t> key{static_cast<int64_t>(in_type), xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3],
                           yd[1], yd[2], sh, sw, top, bottom, left, right, dh, dw};
  try {
    auto prim = GetPrimitive(in_type, key);
    dnnl::stream stream(Engine());
    dnnl::memory src(prim->pd.src_desc(), Engine(), x.untyped_data());
    dnnl::memory dst(prim->pd.dst_desc(), Engine(), y->untyped_data());
    dnnl::memory user_weights(prim->user_weights, Engine(), w.untyped_data());
    dnnl::memory weights = user_weights;
    if (prim->reorder_weights) {
      weights = dnnl::memory(prim->pd.weights_desc(), Engine());
      dnnl::memory scratch(prim->reorder_pd.scratchpad_desc(), Engine());
      prim->reorder.execute(stream, {{DNNL_ARG_FROM, user_weights}, {DNNL_ARG_TO, weights},
                                     {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    dnnl::memory scratch(prim->pd.scratchpad_desc(), Engine());
    prim->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst},
                                {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define FLAXDET_BIND(T)                                                                                      \
  ffi::Ffi::Bind()                                                                                           \
      .Arg<ffi::Buffer<T>>()                                                                                 \
      .Arg<ffi::Buffer<T>>()                                                                                 \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                          \
      .Attr<int64_t>("sh")                                                                                   \
      .Attr<int64_t>("sw")                                                                                   \
      .Attr<int64_t>("top")                                                                                  \
      .Attr<int64_t>("bottom")                                                                               \
      .Attr<int64_t>("left")                                                                                 \
      .Attr<int64_t>("right")                                                                                \
      .Attr<int64_t>("dh")                                                                                   \
      .Attr<int64_t>("dw")

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdetOnednnConvBf16, Conv<ffi::DataType::BF16>, FLAXDET_BIND(ffi::DataType::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxdetOnednnConvF32, Conv<ffi::DataType::F32>, FLAXDET_BIND(ffi::DataType::F32));

// The oneDNN version this library was built against (major * 10000 + minor * 100 + patch), for diagnostics.
extern "C" int flaxdet_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
