//! Key/value rows in f32 or f16. f16 halves what a decode step reads; decode attention over
//! a long context is bound by exactly that.

use half::f16;
use serde::Serialize;

/// Element type of stored keys and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// Exact: the reference numerics.
    #[default]
    F32,
    /// Half the bytes; decode reads them converted on the fly.
    F16,
}

/// A growable buffer of K or V rows.
#[derive(Debug, Clone, PartialEq)]
pub enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// A borrowed view of a [`KvBuf`].
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl KvBuf {
    pub fn new(dtype: KvDtype) -> Self {
        match dtype {
            KvDtype::F32 => Self::F32(Vec::new()),
            KvDtype::F16 => Self::F16(Vec::new()),
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self {
            Self::F32(_) => KvDtype::F32,
            Self::F16(_) => KvDtype::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => 4 * v.len(),
            Self::F16(v) => 2 * v.len(),
        }
    }

    /// Keeps the first `n` values.
    pub fn truncate(&mut self, n: usize) {
        match self {
            Self::F32(v) => v.truncate(n),
            Self::F16(v) => v.truncate(n),
        }
    }

    pub fn reserve(&mut self, n: usize) {
        match self {
            Self::F32(v) => v.reserve(n),
            Self::F16(v) => v.reserve(n),
        }
    }

    pub fn extend_from_f32(&mut self, x: &[f32]) {
        match self {
            Self::F32(v) => v.extend_from_slice(x),
            Self::F16(v) => v.extend(x.iter().map(|&a| f16::from_f32(a))),
        }
    }

    /// Copies rows `rows` (each `width` elements) into a new buffer of the same type.
    pub fn gather(&self, rows: &[u32], width: usize) -> Self {
        fn pick<T: Copy>(v: &[T], rows: &[u32], width: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(rows.len() * width);
            for &r in rows {
                out.extend_from_slice(&v[r as usize * width..(r as usize + 1) * width]);
            }
            out
        }
        match self {
            Self::F32(v) => Self::F32(pick(v, rows, width)),
            Self::F16(v) => Self::F16(pick(v, rows, width)),
        }
    }

    pub fn as_slice(&self) -> KvSlice<'_> {
        match self {
            Self::F32(v) => KvSlice::F32(v),
            Self::F16(v) => KvSlice::F16(v),
        }
    }
}

impl KvSlice<'_> {
    /// The values as f32 (a copy when stored as f16).
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match *self {
            Self::F32(v) => std::borrow::Cow::Borrowed(v),
            Self::F16(v) => std::borrow::Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }
}

/// An element of stored K/V that kernels can read as f32.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn get(self) -> f32;
    /// Eight consecutive values as f32.
    ///
    /// # Safety
    /// `p` must point at 8 readable elements, and the CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}
