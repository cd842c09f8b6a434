//! Vectorisable element-wise maths: exp, softmax pieces, RMSNorm, SiLU.

use super::multiversion;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// exp(x) with about 2 ulp error; branch-free so that loops over it vectorise.
/// Inputs below -88 give exactly 0 (used for masked scores).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-88.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    // Cody-Waite: ln2 split in two so that x - n*ln2 keeps its low bits.
    let f = x - n * LN2_HI - n * LN2_LO; // |f| <= ln2 / 2
    // Taylor series of e^f to degree 7: truncation error < 1e-8 on |f| <= 0.347.
    let p = 1.0 / 5040.0;
    let p = p * f + 1.0 / 720.0;
    let p = p * f + 1.0 / 120.0;
    let p = p * f + 1.0 / 24.0;
    let p = p * f + 1.0 / 6.0;
    let p = p * f + 0.5;
    let p = p * f + 1.0;
    let p = p * f + 1.0;
    let bits = ((n as i32 + 127).max(0) as u32) << 23;
    p * f32::from_bits(bits)
}

multiversion! {
    /// Largest element (-inf for an empty slice).
    pub fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 8];
        let chunks = xs.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                acc[i] = acc[i].max(c[i]);
            }
        }
        let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in rest {
            m = m.max(x);
        }
        m
    }
}

multiversion! {
    /// `xs[i] = exp(xs[i] - m)`; returns the sum of the results.
    pub fn exp_sub_sum(xs: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            for i in 0..8 {
                c[i] = exp_approx(c[i] - m);
                acc[i] += c[i];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp_approx(*x - m);
            s += *x;
        }
        s
    }
}

multiversion! {
    /// Dot product.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let ca = a.chunks_exact(8);
        let cb = b.chunks_exact(8);
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        s
    }
}

multiversion! {
    /// `y[i] = x[i] * w[i] / rms(x)`.
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> () {
        let ss = dot(x, x);
        let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((o, &a), &g) in y.iter_mut().zip(x).zip(w) {
            *o = a * scale * g;
        }
    }
}

multiversion! {
    /// `x[i] = x[i] * w[i] / rms(x)`, in place (Gemma 3's per-head q and k norms).
    pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) -> () {
        let ss = dot(x, x);
        let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for (a, &g) in x.iter_mut().zip(w) {
            *a *= scale * g;
        }
    }
}

multiversion! {
    /// `out[i] = gelu(gate[i]) * up[i]`, gelu in its tanh form (GeGLU, Gemma):
    /// `0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))`, with `1 + tanh(y) = 2 - 2 / (e^2y + 1)`.
    pub fn gelu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> () {
        const C: f32 = 0.797_884_6; // sqrt(2 / pi)
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            let y = C * (g + 0.044_715 * g * g * g);
            *o = g * (1.0 - 1.0 / (exp_approx(2.0 * y) + 1.0)) * u;
        }
    }
}

multiversion! {
    /// `out[i] = silu(gate[i]) * up[i]`.
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> () {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp_approx(-g)) * u;
        }
    }
}

multiversion! {
    /// `y[i] += x[i]`.
    pub fn add_assign(y: &mut [f32], x: &[f32]) -> () {
        for (a, &b) in y.iter_mut().zip(x) {
            *a += b;
        }
    }
}

multiversion! {
    /// `y[i] += a * x[i]`.
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) -> () {
        for (o, &b) in y.iter_mut().zip(x) {
            *o += a * b;
        }
    }
}

multiversion! {
    /// `y[i] *= s`.
    pub fn scale(y: &mut [f32], s: f32) -> () {
        for a in y.iter_mut() {
            *a *= s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        for i in -2000..=800 {
            let x = i as f32 * 0.1;
            let (got, want) = (exp_approx(x), x.exp());
            let rel = ((got - want) / want.max(f32::MIN_POSITIVE)).abs();
            assert!(want < 1e-37 || rel < 1e-6, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
    }

    #[test]
    fn reductions_match_scalar() {
        let xs: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 * 0.03 - 1.5).collect();
        assert_eq!(max(&xs), xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let want: f32 = xs.iter().map(|x| x * x).sum();
        assert!((dot(&xs, &xs) - want).abs() < 1e-4);
        let m = max(&xs);
        let mut ys = xs.clone();
        let s = exp_sub_sum(&mut ys, m);
        let want: f32 = xs.iter().map(|x| (x - m).exp()).sum();
        assert!((s - want).abs() < 1e-5 * want);
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let g: Vec<f32> = (-300..=300).map(|i| i as f32 * 0.05).collect();
        let up = vec![2.0f32; g.len()];
        let mut out = vec![0f32; g.len()];
        gelu_mul(&g, &up, &mut out);
        for (&x, &got) in g.iter().zip(&out) {
            let x64 = x as f64;
            let want = 2.0 * 0.5 * x64 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3))).tanh());
            assert!((got as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "gelu({x}) * 2 = {got}, want {want}");
        }
    }
}
