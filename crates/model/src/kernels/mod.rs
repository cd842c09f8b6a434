//! CPU kernels for the forward pass. Hot loops are compiled twice, once for AVX2+FMA and once
//! for the baseline target (the Q8_0 products also for AVX-512 VNNI), and picked at run time,
//! so a built binary runs on any x86-64.

pub mod attention;
pub mod kv;
pub mod linear;
pub mod math;
pub mod q4;
pub mod q8;
pub mod rope;

/// True when the CPU has AVX2, FMA and F16C (checked once).
#[inline]
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the CPU also has AVX-512 VNNI on 256-bit vectors (`vpdpwssd`; checked once).
#[inline]
pub fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            avx2_fma()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The widest kernel set this CPU runs, for benchmark headers.
pub fn simd_path() -> &'static str {
    if avx512_vnni() {
        "avx512-vnni"
    } else if avx2_fma() {
        "avx2+fma"
    } else {
        "portable"
    }
}

/// The f32 GEMM's kernels (the `gemm` crate, built with its AVX-512 kernels, picks them at
/// run time as we check here), for benchmark headers.
pub fn gemm_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if avx2_fma() && has!("avx512f") && has!("avx512bw") && has!("avx512cd") && has!("avx512dq") && has!("avx512vl") {
            return "avx512";
        }
        if avx2_fma() {
            return "avx2+fma";
        }
    }
    "portable"
}

/// Compiles `$body` (an expression using the function's arguments) as a baseline function and,
/// on x86-64, as an AVX2+FMA one, dispatching at run time. The body must be `#[inline(always)]`
/// code so that it is re-optimised for each target.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2($($arg: $ty),*) -> $ret {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::avx2_fma() {
                // SAFETY: the CPU supports the features `avx2` was compiled for.
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// A raw pointer that may cross threads; each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
