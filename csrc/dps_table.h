// Host-side description of one multi-tensor call, shared by the CPU and CUDA
// modules: one entry per tensor and a chunk table that splits all tensors
// into pieces of at most `chunk` entries, so that one parallel loop (CPU) or
// one launch (CUDA) covers every tensor.
#pragma once
#include <stdint.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "dps_math.h"

namespace dps {

// One tensor of an update call. Pointers are raw addresses of contiguous
// tensors; s is null unless exploring, mask null unless exploiting. m, v and s
// are fp32 or bf16 (the call's StateFormat).
struct TensorArgs {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* s;
  const uint8_t* mask;
  int64_t numel;
  StepConsts step;
  int64_t offset;   // index in the whole tensor of entry 0 (a shard's): the random bits' index
  uint32_t key_a;   // the step's stream keys (rounding.stream_keys), when stores round stochastically
  uint32_t key_b;
  int32_t reset;    // the score restarts at this step
  int32_t aligned;  // every pointer allows 4-entry vector access (CUDA)
};

// One tensor of a selection call.
struct SelectArgs {
  const float* score;
  uint8_t* mask;  // ceil(numel / 8) bytes
  int64_t numel;
  int64_t k;      // keep the k largest scores (ties at the k-th kept too)
};

// One gradient of a masked-norm call (DPSAdamW.clip_grad_norm_).
struct NormArgs {
  const void* g;
  const uint8_t* mask;  // packed bits, ceil(numel / 8) bytes
  int64_t numel;
};

// Entries [index * chunk, min(numel, (index + 1) * chunk)) of tensor `tensor`.
struct Chunk {
  int32_t tensor;
  int32_t index;
};

template <typename Args>
std::vector<Chunk> make_chunks(const std::vector<Args>& tensors, int64_t chunk) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    int64_t count = (tensors[t].numel + chunk - 1) / chunk;
    if (count > INT32_MAX) throw std::invalid_argument("dps_fast: tensor too large for the chunk table");
    for (int64_t c = 0; c < count; ++c) chunks.push_back(Chunk{(int32_t)t, (int32_t)c});
  }
  return chunks;
}

// The arguments of an update call as the Python side passes them: parallel
// lists, one value per tensor (s and mask empty when the mode has none).
struct UpdateLists {
  std::vector<int64_t> p, g, m, v, s, mask, numel, steps, reset, key_a, key_b, offsets;
};

static inline void check_length(const std::vector<int64_t>& list, size_t n, const char* name) {
  if (list.size() != n)
    throw std::invalid_argument(std::string("dps_fast: ") + name + " has " + std::to_string(list.size()) +
                                " entries, expected " + std::to_string(n));
}

// TensorArgs of every non-empty tensor of the call; `item` and `state_item` are the
// bytes per parameter (and gradient) entry and per state entry, for the 4-entry vector
// alignment; `random` says whether the call's stores draw random bits (keys, offsets).
static inline std::vector<TensorArgs> make_tensor_args(int mode, const UpdateLists& l, double lr, double beta1,
                                                       double beta2, int64_t item, int64_t state_item,
                                                       bool random) {
  if (mode < kPlain || mode > kExploitFreeze) throw std::invalid_argument("dps_fast: unknown update mode");
  size_t n = l.p.size();
  check_length(l.g, n, "grads");
  check_length(l.m, n, "exp_avgs");
  check_length(l.v, n, "exp_avg_sqs");
  check_length(l.numel, n, "numels");
  check_length(l.steps, n, "steps");
  if (mode == kExplore) {
    check_length(l.s, n, "scores");
    check_length(l.reset, n, "reset_scores");
  }
  if (mode == kExploitGrad || mode == kExploitFreeze) check_length(l.mask, n, "masks");
  if (random) {
    check_length(l.key_a, n, "key_a");
    check_length(l.key_b, n, "key_b");
    check_length(l.offsets, n, "offsets");
  }
  std::vector<TensorArgs> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (l.numel[i] == 0) continue;
    TensorArgs a;
    a.p = (void*)l.p[i];
    a.g = (const void*)l.g[i];
    a.m = (void*)l.m[i];
    a.v = (void*)l.v[i];
    a.s = mode == kExplore ? (void*)l.s[i] : nullptr;
    a.mask = (mode == kExploitGrad || mode == kExploitFreeze) ? (const uint8_t*)l.mask[i] : nullptr;
    a.numel = l.numel[i];
    a.step = make_step(lr, beta1, beta2, l.steps[i]);
    a.offset = random ? l.offsets[i] : 0;
    if (a.offset < 0) throw std::invalid_argument("dps_fast: offsets must be >= 0");
    a.key_a = random ? (uint32_t)l.key_a[i] : 0u;
    a.key_b = random ? (uint32_t)l.key_b[i] : 0u;
    a.reset = mode == kExplore ? (l.reset[i] != 0) : 0;
    const int64_t state_vector = 4 * state_item;
    a.aligned = l.p[i] % (4 * item) == 0 && l.g[i] % (4 * item) == 0 && l.m[i] % state_vector == 0 &&
                l.v[i] % state_vector == 0 && (a.s == nullptr || l.s[i] % state_vector == 0);
    out.push_back(a);
  }
  return out;
}

static inline std::vector<SelectArgs> make_select_args(const std::vector<int64_t>& scores,
                                                       const std::vector<int64_t>& masks,
                                                       const std::vector<int64_t>& numels,
                                                       const std::vector<int64_t>& ks) {
  size_t n = scores.size();
  check_length(masks, n, "masks");
  check_length(numels, n, "numels");
  check_length(ks, n, "ks");
  std::vector<SelectArgs> out;
  for (size_t i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    if (ks[i] < 1 || ks[i] > numels[i]) throw std::invalid_argument("dps_fast: k must be in [1, numel]");
    out.push_back(SelectArgs{(const float*)scores[i], (uint8_t*)masks[i], numels[i], ks[i]});
  }
  return out;
}

// NormArgs of every tensor of a masked-norm call (empty ones too: their norm is 0).
static inline std::vector<NormArgs> make_norm_args(const std::vector<int64_t>& grads,
                                                   const std::vector<int64_t>& masks,
                                                   const std::vector<int64_t>& numels) {
  size_t n = grads.size();
  check_length(masks, n, "masks");
  check_length(numels, n, "numels");
  std::vector<NormArgs> out;
  for (size_t i = 0; i < n; ++i) out.push_back(NormArgs{(const void*)grads[i], (const uint8_t*)masks[i], numels[i]});
  return out;
}

static inline int64_t dtype_size(int dtype) {
  if (dtype == kFloat32) return 4;
  if (dtype == kBFloat16 || dtype == kFloat16) return 2;
  throw std::invalid_argument("dps_fast: unsupported dtype code " + std::to_string(dtype));
}

static inline int64_t state_size(int state_format) {
  if (state_format == kStateFp32) return 4;
  if (state_format == kStateBf16) return 2;
  throw std::invalid_argument("dps_fast: unsupported state format code " + std::to_string(state_format));
}

}  // namespace dps
