//! The state decoder on any chunk stream for the tiny test model (tests/common tiny_model's
//! config). Input: a flags byte (bit 0: the receiver keeps f16 K/V; bit 1: rewrite every
//! trailer to match the rows before it, so that mutations get past the checksum), then each
//! chunk as a little-endian u16 length and its protobuf; seeds in fuzz/seeds/state_decoder.
//! No panic, and the assembler never holds more than one row per header token and layer.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lazyserve_model::{Config, KvDtype};
use lazyserve_proto::v1::state_chunk::Part;
use lazyserve_proto::v1::StateChunk;
use lazyserve_state::StateAssembler;
use prost::Message;

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| Config::from_hf_json(include_str!("../../tests/tiny-config.json")).expect("tiny config"))
}

fn chunks(mut data: &[u8]) -> Vec<StateChunk> {
    let mut out = Vec::new();
    while let [a, b, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
        if let Ok(c) = StateChunk::decode(&rest[..len]) {
            out.push(c);
        }
        data = &rest[len..];
    }
    out
}

fn retrail(chunks: &mut [StateChunk]) {
    let le = |xs: &[u32]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (mut rows, mut bytes, mut crc) = (0u32, 0u64, 0u32);
    for c in chunks {
        let parts: Vec<Vec<u8>> = match &mut c.part {
            Some(Part::Trailer(t)) => {
                (t.row_chunks, t.payload_bytes, t.crc32c) = (rows, bytes, crc);
                continue;
            }
            Some(Part::Kv(r)) => vec![le(&r.positions), r.k.clone(), r.v.clone(), r.k_scales.clone(), r.v_scales.clone()],
            Some(Part::Aux(r)) => vec![le(&r.positions), r.hidden.clone()],
            _ => continue,
        };
        rows = rows.wrapping_add(1);
        for p in parts {
            bytes += p.len() as u64;
            crc = crc32c::crc32c_append(crc, &p);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut stream = chunks(rest);
    if flags & 2 != 0 {
        retrail(&mut stream);
    }
    let cfg = config();
    let kv = if flags & 1 != 0 { KvDtype::F16 } else { KvDtype::F32 };
    let per_token = cfg.num_hidden_layers * (4 + 2 * cfg.kv_dim() * 4 + 4 + cfg.hidden_size * 4);
    let mut asm = StateAssembler::new(cfg, kv);
    let mut tokens = 0;
    for c in stream {
        let header_tokens = match &c.part {
            Some(Part::Header(h)) => h.tokens.len(),
            _ => tokens,
        };
        let pushed = asm.push(c, "tiny");
        if pushed.is_ok() && asm.chunks() == 1 {
            tokens = header_tokens;
        }
        assert!(asm.bytes() <= tokens * per_token, "{} bytes held for {tokens} tokens", asm.bytes());
        if pushed.is_err() {
            return;
        }
    }
    let _ = asm.finish(cfg);
});
