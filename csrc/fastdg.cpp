// Every fastdg op schema, in one TORCH_LIBRARY block. Device kernels register themselves
// in csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(fastdg, CPU)) and csrc/cuda/<op>.cu
// (TORCH_LIBRARY_IMPL(fastdg, CUDA)); fake (meta) kernels, autograd and dispatch between
// backends live in Python (fastdg/ops/). These are the streaming kernels the fused ops are
// built from: each one is a single pass over its large inputs.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastdg, m) {
  // ---- Batch-Instance Normalization (METHODS.md section 1) -------------------------------
  // x: (N, C, H, W), contiguous NCHW or channels_last. Per-(n, c) mean and biased variance
  // over (h, w), accumulated in fp32 (fp64 for fp64 x), merged Welford/Chan style.
  m.def("bin_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // y[n,c,h,w] = scale[n,c] * x[n,c,h,w] + shift[n,c]; y has x's dtype and memory format.
  m.def("bin_apply(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  // Per (n, c): sum_dy = sum_hw dy, sum_dy_xc = sum_hw dy * (x - mean[n,c]).
  m.def("bin_bwd_reduce(Tensor dy, Tensor x, Tensor mean) -> (Tensor sum_dy, Tensor sum_dy_xc)");
  // dx[n,c,h,w] = p[n,c] * dy + q[n,c] * x + r[n,c]; dx has x's dtype and memory format.
  m.def("bin_bwd_apply(Tensor dy, Tensor x, Tensor p, Tensor q, Tensor r) -> Tensor");

  // ---- Per-group loss aggregation (METHODS.md section 2) ---------------------------------
  // logits (N, K), target (N,) int64, group (N,) int64 in [0, G). Per-sample (label-smoothed)
  // cross-entropy, its log-sum-exp, and fixed-order per-group sums and counts (fp32).
  m.def("group_loss_stats(Tensor logits, Tensor target, Tensor group, int num_groups, "
        "float label_smoothing) -> (Tensor losses, Tensor lse, Tensor sums, Tensor counts)");
  // Per-sample losses (N,) -> per-group sums and counts.
  m.def("group_loss_sums(Tensor losses, Tensor group, int num_groups) -> (Tensor sums, Tensor counts)");
  // q_new = normalise(q * exp(eta * (sums / max(counts, 1) + adjustment))), group_mean = sums / max(counts, 1),
  // robust = sum_g q_new[g] * group_mean[g]. Empty groups keep their weight.
  m.def("group_q_update(Tensor q, Tensor sums, Tensor counts, float eta, Tensor? adjustment) "
        "-> (Tensor q_new, Tensor group_mean, Tensor robust)");
  // grad_logits[i] = group_scale[group[i]] * (softmax(logits[i]) - smoothed_onehot(target[i])).
  m.def("group_loss_bwd(Tensor logits, Tensor target, Tensor group, Tensor lse, Tensor group_scale, "
        "float label_smoothing) -> Tensor");

  // The fused eager path (C++ CPU): stats + q update in one call, with a C++ autograd backward
  // that reads the softmax the forward saved (probs: (N, K) when save_probs, else (0,)).
  m.def("group_loss_fused(Tensor logits, Tensor target, Tensor group, Tensor q, float eta, float label_smoothing, "
        "Tensor? adjustment) -> (Tensor robust, Tensor q_new, Tensor group_mean, Tensor counts)");
  m.def("group_loss_fused_fwd(Tensor logits, Tensor target, Tensor group, Tensor q, float eta, "
        "float label_smoothing, Tensor? adjustment, bool save_probs) "
        "-> (Tensor robust, Tensor q_new, Tensor group_mean, Tensor counts, Tensor probs)");
  // grad_logits[i] = grad * q_new[g_i] / max(counts[g_i], 1) * (probs[i] - smoothed_onehot(target[i])), in dtype.
  m.def("group_loss_probs_bwd(Tensor probs, Tensor target, Tensor group, Tensor grad, Tensor q_new, "
        "Tensor counts, float label_smoothing, ScalarType dtype) -> Tensor");

  // ---- Batched k-means (METHODS.md section 4) ---------------------------------------------
  // Rows of x (N, D) sorted by group: group g owns rows offsets[g]..offsets[g+1] (offsets (G+1,)
  // int64, on x's device). Centroids/centers are fp32 (fp64 for fp64 x); k (G,) int64 is the
  // number of clusters in use per group, 0 = skip the group (labels -1, min_dist 0, no sums).
  // d(x, c) = ||x||^2 - 2 x.c + ||c||^2 clamped at 0, ties to the lowest index. Every reduction
  // runs in a fixed order (deterministic).
  // labels (N,) int64 in [0, k[g]), min_dist (N,) squared distance to the chosen centroid.
  m.def("kmeans_assign(Tensor x, Tensor centroids, Tensor offsets, Tensor k) -> (Tensor labels, Tensor min_dist)");
  // Per-(group, cluster) coordinate sums (G, kmax, D) and counts (G, kmax) int64; labels < 0 ignored.
  m.def("kmeans_update(Tensor x, Tensor labels, Tensor offsets, int kmax) -> (Tensor sums, Tensor counts)");
  // One Lloyd pass over x: kmeans_assign + kmeans_update on its labels + per-group inertia (G,).
  m.def("kmeans_step(Tensor x, Tensor centroids, Tensor offsets, Tensor k) "
        "-> (Tensor labels, Tensor min_dist, Tensor sums, Tensor counts, Tensor inertia)");
  // (N, L) squared distances of every row to each of the L centers (G, L, D) of its group (k-means++).
  m.def("kmeans_dist(Tensor x, Tensor centers, Tensor offsets) -> Tensor");
}

// `import fastdg._C` loads this library (and so runs the registrations above); the module
// itself has no Python attributes: everything is reached through torch.ops.fastdg.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
