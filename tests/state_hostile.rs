//! The state decoder against hostile streams: a valid stream from the tiny random model,
//! mutated (fields changed, payloads resized, chunks dropped, duplicated, reordered, the stream
//! cut), wholly arbitrary chunks, and arbitrary protobuf bytes. Whatever it is sent, it refuses
//! with an error or yields a state that decoding can continue; it never panics and never holds
//! more than one K/V row and one Aux Cache row per header token and layer.

use std::sync::OnceLock;

use lazyserve_engine::lazy::{self, SequenceState};
use lazyserve_model::{KvDtype, Model};
use lazyserve_proto::v1::state_chunk::Part;
use lazyserve_proto::v1::{AuxRows, KvRows, SamplingParams, StateChunk, StateEncoding, StateHeader, StateTrailer};
use lazyserve_state::{StateAssembler, StateError};
use lazyserve_tests::{prefill_and_encode, tiny_model};
use proptest::prelude::*;
use prost::Message;

const SPEC: &str = "2:0.5,4:0.5";

struct Fixture {
    model: Model,
    /// Valid streams: (the receiver's K/V dtype, chunks).
    streams: Vec<(KvDtype, Vec<StateChunk>)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let model = tiny_model();
        let prompt: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 101).collect();
        let streams = [(KvDtype::F32, StateEncoding::F32), (KvDtype::F16, StateEncoding::F16), (KvDtype::F16, StateEncoding::Int8)]
            .into_iter()
            .map(|(kv, encoding)| (kv, prefill_and_encode(&model, kv, encoding, SPEC, &prompt).expect("tiny prefill").1))
            .collect();
        Fixture { model, streams }
    })
}

/// Rewrites every trailer to match the row chunks before it, so that a mutation reaches the
/// checks behind the checksum.
fn retrail(chunks: &mut [StateChunk]) {
    let le = |xs: &[u32]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (mut rows, mut bytes, mut crc) = (0u32, 0u64, 0u32);
    for c in chunks {
        if let Some(Part::Trailer(t)) = &mut c.part {
            (t.row_chunks, t.payload_bytes, t.crc32c) = (rows, bytes, crc);
            continue;
        }
        let (positions, parts): (Vec<u8>, Vec<&[u8]>) = match &c.part {
            Some(Part::Kv(r)) => (le(&r.positions), vec![&r.k, &r.v, &r.k_scales, &r.v_scales]),
            Some(Part::Aux(r)) => (le(&r.positions), vec![&r.hidden]),
            _ => continue,
        };
        rows += 1;
        for p in std::iter::once(positions.as_slice()).chain(parts) {
            bytes += p.len() as u64;
            crc = crc32c::crc32c_append(crc, p);
        }
    }
}

/// Pushes `chunks` and finishes; checks after every chunk that the assembler holds no more
/// than the accepted header allows. A finished state must take a decode step without panicking.
fn decode(kv: KvDtype, chunks: Vec<StateChunk>) -> std::result::Result<Option<SequenceState>, TestCaseError> {
    let model = &fixture().model;
    let cfg = model.config();
    let per_token = cfg.num_hidden_layers * (4 + 2 * cfg.kv_dim() * 4 + 4 + cfg.hidden_size * 4);
    let mut asm = StateAssembler::new(cfg, kv);
    let mut tokens = 0;
    for c in chunks {
        let header_tokens = match &c.part {
            Some(Part::Header(h)) => h.tokens.len(),
            _ => tokens,
        };
        let pushed = asm.push(c, "tiny");
        if pushed.is_ok() && asm.chunks() == 1 {
            tokens = header_tokens;
        }
        prop_assert!(asm.bytes() <= tokens * per_token, "{} bytes held for {tokens} tokens", asm.bytes());
        if let Err(e) = pushed {
            prop_assert!(!e.to_string().is_empty());
            return Ok(None);
        }
    }
    let Ok((_, mut state)) = asm.finish(cfg) else { return Ok(None) };
    if let Ok(logits) = lazy::step(model, &mut state, &[5]) {
        prop_assert_eq!(logits.len(), cfg.vocab_size);
    }
    Ok(Some(state))
}

#[derive(Debug, Clone)]
enum Mutation {
    Drop(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Truncate(usize),
    Empty(usize),
    FlipByte { chunk: usize, field: usize, at: usize, xor: u8 },
    Resize { chunk: usize, field: usize, len: usize },
    Layer { chunk: usize, layer: u32 },
    Position { chunk: usize, at: usize, value: u32 },
    DropPosition { chunk: usize, at: usize },
    Tokens(Vec<u32>),
    Token { at: usize, value: u32 },
    Prune(String),
    Shape { field: usize, value: u32 },
    Encoding(i32),
    Version(u32),
    NoSampling,
    Trailer { field: usize, value: u64 },
}

fn small_or_any() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..16, 0u32..300, any::<u32>()]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = || any::<usize>();
    prop_oneof![
        i().prop_map(Mutation::Drop),
        i().prop_map(Mutation::Duplicate),
        (i(), i()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        i().prop_map(Mutation::Truncate),
        i().prop_map(Mutation::Empty),
        (i(), i(), i(), 1u8..=255).prop_map(|(chunk, field, at, xor)| Mutation::FlipByte { chunk, field, at, xor }),
        (i(), i(), prop_oneof![0usize..64, 0usize..8192]).prop_map(|(chunk, field, len)| Mutation::Resize { chunk, field, len }),
        (i(), small_or_any()).prop_map(|(chunk, layer)| Mutation::Layer { chunk, layer }),
        (i(), i(), small_or_any()).prop_map(|(chunk, at, value)| Mutation::Position { chunk, at, value }),
        (i(), i()).prop_map(|(chunk, at)| Mutation::DropPosition { chunk, at }),
        proptest::collection::vec(0u32..120, 0..300).prop_map(Mutation::Tokens),
        (i(), small_or_any()).prop_map(|(at, value)| Mutation::Token { at, value }),
        prop_oneof![
            proptest::sample::select(vec!["off", "default", "static:2:0.5,4:0.5", "random:2:0.5,4:0.5", "1:0.5", "2:0.5", "4:0.1", "2:0.5,4:0.5+sinks=3+maxpool=3+window=4", "5:0.5", ""])
                .prop_map(String::from),
            "\\PC{0,20}",
        ]
        .prop_map(Mutation::Prune),
        (0usize..3, small_or_any()).prop_map(|(field, value)| Mutation::Shape { field, value }),
        prop_oneof![0i32..4, any::<i32>()].prop_map(Mutation::Encoding),
        prop_oneof![0u32..3, any::<u32>()].prop_map(Mutation::Version),
        Just(Mutation::NoSampling),
        (0usize..3, any::<u64>()).prop_map(|(field, value)| Mutation::Trailer { field, value }),
    ]
}

/// The byte field `field` (modulo how many it has) of a row chunk.
fn payload(part: &mut Part, field: usize) -> Option<&mut Vec<u8>> {
    match part {
        Part::Kv(r) => Some([&mut r.k, &mut r.v, &mut r.k_scales, &mut r.v_scales].into_iter().nth(field % 4).unwrap()),
        Part::Aux(r) => Some(&mut r.hidden),
        _ => None,
    }
}

fn positions(part: &mut Part) -> Option<&mut Vec<u32>> {
    match part {
        Part::Kv(r) => Some(&mut r.positions),
        Part::Aux(r) => Some(&mut r.positions),
        _ => None,
    }
}

fn apply(chunks: &mut Vec<StateChunk>, m: Mutation) {
    if chunks.is_empty() {
        return;
    }
    let n = chunks.len();
    let header = match &mut chunks[0].part {
        Some(Part::Header(h)) => Some(h),
        _ => None,
    };
    match (m, header) {
        (Mutation::Drop(i), _) => drop(chunks.remove(i % n)),
        (Mutation::Duplicate(i), _) => chunks.insert(i % n, chunks[i % n].clone()),
        (Mutation::Swap(a, b), _) => chunks.swap(a % n, b % n),
        (Mutation::Truncate(i), _) => chunks.truncate(i % n),
        (Mutation::Empty(i), _) => chunks[i % n].part = None,
        (Mutation::FlipByte { chunk, field, at, xor }, _) => {
            if let Some(bytes) = chunks[chunk % n].part.as_mut().and_then(|p| payload(p, field)).filter(|b| !b.is_empty()) {
                let len = bytes.len();
                bytes[at % len] ^= xor;
            }
        }
        (Mutation::Resize { chunk, field, len }, _) => {
            if let Some(bytes) = chunks[chunk % n].part.as_mut().and_then(|p| payload(p, field)) {
                bytes.resize(len, 0x3c);
            }
        }
        (Mutation::Layer { chunk, layer }, _) => match &mut chunks[chunk % n].part {
            Some(Part::Kv(r)) => r.layer = layer,
            Some(Part::Aux(r)) => r.layer = layer,
            _ => {}
        },
        (Mutation::Position { chunk, at, value }, _) => {
            if let Some(ps) = chunks[chunk % n].part.as_mut().and_then(positions).filter(|p| !p.is_empty()) {
                let len = ps.len();
                ps[at % len] = value;
            }
        }
        (Mutation::DropPosition { chunk, at }, _) => {
            if let Some(ps) = chunks[chunk % n].part.as_mut().and_then(positions).filter(|p| !p.is_empty()) {
                let len = ps.len();
                ps.remove(at % len);
            }
        }
        (Mutation::Tokens(tokens), Some(h)) => h.tokens = tokens,
        (Mutation::Token { at, value }, Some(h)) if !h.tokens.is_empty() => {
            let len = h.tokens.len();
            h.tokens[at % len] = value;
        }
        (Mutation::Prune(spec), Some(h)) => h.prune = spec,
        (Mutation::Shape { field, value }, Some(h)) => *[&mut h.num_layers, &mut h.kv_width, &mut h.hidden_size][field] = value,
        (Mutation::Encoding(e), Some(h)) => h.encoding = e,
        (Mutation::Version(v), Some(h)) => h.version = v,
        (Mutation::NoSampling, Some(h)) => h.sampling = None,
        (Mutation::Trailer { field, value }, _) => {
            if let Some(Part::Trailer(t)) = &mut chunks[n - 1].part {
                match field {
                    0 => t.row_chunks = value as u32,
                    1 => t.payload_bytes = value,
                    _ => t.crc32c = value as u32,
                }
            }
        }
        _ => {}
    }
}

/// A row chunk whose byte sizes are often right for the tiny model (kv width 32, hidden 64).
fn row_chunk() -> impl Strategy<Value = Part> {
    let bytes = |n: usize, elem: usize, exact: bool| {
        if exact { Just(vec![0x11u8; n * elem]).boxed() } else { proptest::collection::vec(any::<u8>(), 0..n * elem + 8).boxed() }
    };
    (small_or_any(), proptest::collection::vec(prop_oneof![0u32..16, any::<u32>()], 0..16), prop_oneof![Just(1usize), Just(2), Just(4)], any::<bool>())
        .prop_flat_map(move |(layer, positions, elem, exact)| {
            let n = positions.len();
            prop_oneof![
                (bytes(n, 32 * elem, exact), bytes(n, 32 * elem, exact), bytes(n, 8, exact), bytes(n, 8, exact)).prop_map({
                    let positions = positions.clone();
                    move |(k, v, k_scales, v_scales)| Part::Kv(KvRows { layer, positions: positions.clone(), k, v, k_scales, v_scales })
                }),
                bytes(n, 64 * elem, exact).prop_map(move |hidden| Part::Aux(AuxRows { layer, positions: positions.clone(), hidden })),
            ]
        })
}

fn header() -> impl Strategy<Value = Part> {
    (
        prop_oneof![Just(1u32), any::<u32>()],
        prop_oneof![Just("tiny".to_string()), "\\PC{0,8}"],
        proptest::collection::vec(prop_oneof![0u32..101, any::<u32>()], 0..300),
        prop_oneof![Just("off".to_string()), Just(SPEC.to_string()), "\\PC{0,12}"],
        any::<bool>(),
        0i32..4,
        (prop_oneof![Just(6u32), any::<u32>()], prop_oneof![Just(32u32), any::<u32>()], prop_oneof![Just(64u32), any::<u32>()]),
    )
        .prop_map(|(version, model, tokens, prune, sampling, encoding, (num_layers, kv_width, hidden_size))| {
            Part::Header(StateHeader {
                version,
                sequence_id: "seq".into(),
                model,
                tokens,
                prune,
                sampling: sampling.then(SamplingParams::default),
                encoding,
                num_layers,
                kv_width,
                hidden_size,
                ttl_ms: 1000,
            })
        })
}

fn chunk() -> impl Strategy<Value = StateChunk> {
    let trailer = (any::<u32>(), any::<u64>(), any::<u32>())
        .prop_map(|(row_chunks, payload_bytes, crc32c)| Part::Trailer(StateTrailer { row_chunks, payload_bytes, crc32c }));
    proptest::option::weighted(0.95, prop_oneof![1 => header(), 6 => row_chunk(), 1 => trailer]).prop_map(|part| StateChunk { part })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_streams_are_refused_or_decode(
        stream in 0usize..3,
        mutations in proptest::collection::vec(mutation(), 1..4),
        fix_trailer in any::<bool>(),
    ) {
        let (kv, valid) = &fixture().streams[stream];
        let mut chunks = valid.clone();
        for m in mutations {
            apply(&mut chunks, m);
        }
        if fix_trailer {
            retrail(&mut chunks);
        }
        decode(*kv, chunks)?;
    }

    #[test]
    fn arbitrary_chunks_are_refused_or_decode(
        valid_header in any::<bool>(),
        chunks in proptest::collection::vec(chunk(), 0..12),
        fix_trailer in any::<bool>(),
        f16 in any::<bool>(),
    ) {
        let kv = if f16 { KvDtype::F16 } else { KvDtype::F32 };
        let mut chunks: Vec<StateChunk> = if valid_header { vec![fixture().streams[0].1[0].clone()] } else { vec![] }.into_iter().chain(chunks).collect();
        if fix_trailer {
            retrail(&mut chunks);
        }
        decode(kv, chunks)?;
    }

    #[test]
    fn arbitrary_protobuf_bytes_are_refused_or_decode(messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..8)) {
        let mut chunks = vec![fixture().streams[1].1[0].clone()];
        chunks.extend(messages.iter().filter_map(|m| StateChunk::decode(m.as_slice()).ok()));
        decode(KvDtype::F16, chunks)?;
    }
}

/// The harness is not vacuous: the valid streams decode, a retrailed one too, and a mutation
/// that keeps the stream valid (other token ids) is accepted.
#[test]
fn valid_streams_pass_the_harness() -> Result<(), TestCaseError> {
    for (kv, chunks) in &fixture().streams {
        prop_assert!(decode(*kv, chunks.clone())?.is_some());
        let mut retrailed = chunks.clone();
        retrail(&mut retrailed);
        prop_assert_eq!(&retrailed, chunks);
        let mut other_tokens = chunks.clone();
        apply(&mut other_tokens, Mutation::Token { at: 3, value: 100 });
        prop_assert!(decode(*kv, other_tokens)?.is_some());
    }
    Ok(())
}

fn refusal(kv: KvDtype, chunks: Vec<StateChunk>) -> String {
    let mut asm = StateAssembler::new(fixture().model.config(), kv);
    for c in chunks {
        if let Err(e) = asm.push(c, "tiny") {
            return e.to_string();
        }
    }
    match asm.finish(fixture().model.config()) {
        Err(e) => e.to_string(),
        Ok(_) => "accepted".into(),
    }
}

#[test]
fn hostile_streams_are_refused_with_the_reason() {
    let (kv, valid) = &fixture().streams[1];
    let cases: Vec<(Vec<Mutation>, &str)> = vec![
        (vec![Mutation::Tokens((0..300).collect())], "300 tokens, this model's context holds 255"),
        (vec![Mutation::Token { at: 0, value: 101 }], "token 101 is not below the vocabulary size 101"),
        (vec![Mutation::Shape { field: 0, value: u32::MAX }], "does not match this model"),
        (vec![Mutation::Prune("29:0.5".into())], "invalid prune"),
        (vec![Mutation::Swap(1, 3)], "out of order"),
        (vec![Mutation::Position { chunk: 1, at: 0, value: 12 }], "position 12 is past the 12 tokens"),
        (vec![Mutation::Empty(2)], "empty chunk"),
        (vec![Mutation::Duplicate(1)], "more K/V rows than tokens"),
        (vec![Mutation::Resize { chunk: 1, field: 1, len: 1 }], "do not match"),
        (vec![Mutation::Layer { chunk: 1, layer: u32::MAX }], "layer 4294967295 of 6"),
        // Found by the property test: a state computed under one schedule but naming another
        // was accepted, and its first decode step indexed a row that is not there (a panic).
        (vec![Mutation::Prune("1:0.5".into())], "the schedule does not prune there"),
    ];
    for (mutations, why) in cases {
        let mut chunks = valid.clone();
        for m in mutations.clone() {
            apply(&mut chunks, m);
        }
        retrail(&mut chunks);
        let err = refusal(*kv, chunks);
        assert!(err.contains(why), "{mutations:?}: {err}");
    }
    // A refused stream stays refused, even if what follows is fine.
    let mut asm = StateAssembler::new(fixture().model.config(), *kv);
    assert!(asm.push(valid[1].clone(), "tiny").is_err());
    let err = asm.push(valid[0].clone(), "tiny").unwrap_err();
    assert!(matches!(err, StateError::Invalid(m) if m.contains("after a refused one")));
}

/// Seeds for the cargo-fuzz state_decoder target (fuzz/fuzz_targets/state_decoder.rs reads
/// this format): a flags byte, then each chunk as a little-endian u16 length and its protobuf.
#[test]
#[ignore = "writes fuzz/seeds/state_decoder; run by hand when the wire format changes"]
fn write_fuzz_seeds() -> std::io::Result<()> {
    let dir = lazyserve_tests::repo_root().join("fuzz/seeds/state_decoder");
    std::fs::create_dir_all(&dir)?;
    for (i, (kv, chunks)) in fixture().streams.iter().enumerate() {
        let mut out = vec![u8::from(*kv == KvDtype::F16)];
        for c in chunks {
            let bytes = c.encode_to_vec();
            out.extend_from_slice(&u16::try_from(bytes.len()).expect("tiny chunks").to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        std::fs::write(dir.join(format!("valid-{i}")), out)?;
    }
    Ok(())
}
