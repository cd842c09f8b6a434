//! lazyserve's gRPC API (`proto/lazyserve/v1`), compiled once here. Generated code only,
//! and its conversions to lazyserve-request's types; the state codec is lazyserve-state.

/// Generated types and services of package `lazyserve.v1`.
pub mod v1 {
    tonic::include_proto!("lazyserve.v1");
}

/// The encoded descriptors of `lazyserve.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lazyserve_v1_descriptor");

impl From<v1::SamplingParams> for lazyserve_request::SamplingParams {
    fn from(p: v1::SamplingParams) -> Self {
        Self { temperature: p.temperature, top_k: p.top_k as usize, top_p: p.top_p, seed: p.seed }
    }
}

impl From<&lazyserve_request::SamplingParams> for v1::SamplingParams {
    fn from(p: &lazyserve_request::SamplingParams) -> Self {
        Self { temperature: p.temperature, top_k: p.top_k as u32, top_p: p.top_p, seed: p.seed }
    }
}
