// The vectorised row kernel of the dense KD loss (kd_loss_cpu.cpp's fast path): every student dtype but double,
// the row as float. Per row: a sweep for the maxima (and the NaN/+inf check), a sweep for the three normalisers and
// the teacher-weighted sum, and a sweep writing the gradient; the row stays in L2 between sweeps, so each logit comes
// from memory once. This costs three exponentials per logit and sweep instead of the rescaling exponentials of an
// online softmax.
//
// Compiled once per instruction set, like wide_conv_f32.h: included only by csrc/cpu/isa/kernels_body.h.
#ifndef PTD_ISA_VECTOR_BYTES
#error "kd_row_f32.h is compiled per instruction set: include csrc/cpu/isa/kernels_body.h instead"
#endif

// scratch holds 3 * classes floats, rounded up to whole vectors (kLanes).
inline cpu_isa::KdRowResult kd_row_f32(const float* s, const float* t, int64_t classes, int64_t label, float inv_t,
                                       float kd_weight, float ce_weight, float kd_grad, float ce_grad, float* scratch,
                                       float* grad) {
  using wide::broadcast;
  using wide::kLanes;
  using wide::load;
  using wide::vec;
  constexpr float inf = std::numeric_limits<float>::infinity();
  const int64_t vector_end = classes / kLanes * kLanes;
  vec max_s = broadcast(-inf), max_t = broadcast(-inf);
  wide::ivec bad_s{}, bad_t{};
  for (int64_t c = 0; c < vector_end; c += kLanes) {
    const vec vs = load(s + c), vt = load(t + c);
    bad_s |= (vs != vs) | (vs == inf);
    bad_t |= (vt != vt) | (vt == inf);
    max_s = vs > max_s ? vs : max_s;
    max_t = vt > max_t ? vt : max_t;
  }
  float ms = vmath::horizontal_max(max_s), mt = vmath::horizontal_max(max_t);
  bool any_bad_s = false, any_bad_t = false;
  for (int i = 0; i < kLanes; ++i) any_bad_s |= bad_s[i] != 0, any_bad_t |= bad_t[i] != 0;
  for (int64_t c = vector_end; c < classes; ++c) {
    any_bad_s |= std::isnan(s[c]) || s[c] == inf;
    any_bad_t |= std::isnan(t[c]) || t[c] == inf;
    ms = std::max(ms, s[c]);
    mt = std::max(mt, t[c]);
  }
  any_bad_s |= ms == -inf;
  any_bad_t |= mt == -inf;
  if (any_bad_s || any_bad_t) return {0.0f, any_bad_s, any_bad_t};

  // Sweep 2: the exponentials, kept in the scratch rows for sweep 3 so each is computed once.
  const vec v_inv_t = broadcast(inv_t), v_ms = broadcast(ms), v_mt = broadcast(mt), zero{};
  vec z_st{}, z_s1{}, z_t{}, weighted{};
  const bool need_kd = kd_weight != 0, need_ce = ce_weight != 0, same_scale = inv_t == 1.0f;
  const int64_t padded = wide::round_up(classes, kLanes);
  float* e_st = scratch;                 // exp((s - ms) / T)
  float* e_t = scratch + padded;         // exp((t - mt) / T)
  float* e_s1 = same_scale ? e_st : scratch + 2 * padded;  // exp(s - ms)
  // The last partial vector runs on copies padded with -inf, whose exponentials are exactly 0: no scalar exp.
  float s_tail[kLanes], t_tail[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) {
    s_tail[i] = vector_end + i < classes ? s[vector_end + i] : -inf;
    t_tail[i] = vector_end + i < classes ? t[vector_end + i] : -inf;
  }
  for (int64_t c = 0; c < padded; c += kLanes) {
    const vec vs = load(c < vector_end ? s + c : s_tail), vt = load(c < vector_end ? t + c : t_tail);
    const vec ds = vs - v_ms;
    if (need_kd) {
      const vec et = vmath::exp_nonpositive((vt - v_mt) * v_inv_t), est = vmath::exp_nonpositive(ds * v_inv_t);
      wide::store(e_t + c, et);
      wide::store(e_st + c, est);
      z_st += est;
      z_t += et;
      weighted += et > zero ? et * ((vt - vs) * v_inv_t) : zero;  // classes the teacher rules out add nothing
    }
    if (need_ce) {
      const vec es1 = same_scale && need_kd ? load(e_st + c) : vmath::exp_nonpositive(ds);
      wide::store(e_s1 + c, es1);
      z_s1 += es1;
    }
  }
  const float sum_st = vmath::horizontal_sum(z_st), sum_s1 = vmath::horizontal_sum(z_s1);
  const float sum_t = vmath::horizontal_sum(z_t), sum_w = vmath::horizontal_sum(weighted);
  float loss = 0;
  if (need_kd) loss += kd_weight * (sum_w / sum_t - ((mt - ms) * inv_t + std::log(sum_t) - std::log(sum_st)));
  if (need_ce) loss += ce_weight * (ms - s[label] + std::log(sum_s1));
  if (!grad) return {loss, false, false};

  // Sweep 3: the gradient from the stored exponentials.
  const float kd_st = need_kd ? kd_grad / sum_st : 0.0f, kd_t = need_kd ? kd_grad / sum_t : 0.0f;
  const float ce_s1 = need_ce ? ce_grad / sum_s1 : 0.0f;
  const vec v_kd_st = broadcast(kd_st), v_kd_t = broadcast(kd_t), v_ce_s1 = broadcast(ce_s1);
  for (int64_t c = 0; c < vector_end; c += kLanes) {
    vec g{};
    if (need_kd) g += v_kd_st * load(e_st + c) - v_kd_t * load(e_t + c);
    if (need_ce) g += v_ce_s1 * load(e_s1 + c);
    wide::store(grad + c, g);
  }
  for (int64_t c = vector_end; c < classes; ++c)
    grad[c] = (need_kd ? kd_st * e_st[c] - kd_t * e_t[c] : 0.0f) + (need_ce ? ce_s1 * e_s1[c] : 0.0f);
  if (need_ce) grad[label] -= ce_grad;
  return {loss, false, false};
}

