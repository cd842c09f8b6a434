//! The sequence state wire codec on a tiny random model: a state shipped as chunks and
//! rebuilt decodes exactly like the original; a truncated, corrupted or foreign stream is
//! refused before any of it is used.

use anyhow::Result;
use lazyserve_engine::lazy::{self, SequenceState};
use lazyserve_model::{KvDtype, Model};
use lazyserve_state::{StateAssembler, StateError};
use lazyserve_proto::v1::state_chunk::Part;
use lazyserve_proto::v1::{StateChunk, StateEncoding};
use lazyserve_tests::tiny_model;

const SPEC: &str = "2:0.5,4:0.5";

fn prompt() -> Vec<u32> {
    (0..40).map(|i| (i * 7 + 3) % 101).collect()
}

fn prefill_and_encode(model: &Model, kv: KvDtype, encoding: StateEncoding, spec: &str) -> Result<(SequenceState, Vec<StateChunk>)> {
    lazyserve_tests::prefill_and_encode(model, kv, encoding, spec, &prompt())
}

fn assemble(model: &Model, kv: KvDtype, chunks: Vec<StateChunk>) -> Result<SequenceState, StateError> {
    let mut asm = StateAssembler::new(model.config(), kv);
    for c in chunks {
        asm.push(c, "tiny")?;
    }
    asm.finish(model.config()).map(|(_, s)| s)
}

/// Decodes the same tokens from both states; returns the largest logit difference over the
/// largest logit magnitude.
fn decode_both(model: &Model, a: &mut SequenceState, b: &mut SequenceState) -> Result<f32> {
    let (mut worst, mut scale) = (0f32, 0f32);
    for t in [5u32, 17, 42, 99, 1, 64] {
        let la = lazy::step(model, a, &[t])?;
        let lb = lazy::step(model, b, &[t])?;
        worst = la.iter().zip(&lb).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
        scale = la.iter().map(|x| x.abs()).fold(scale, f32::max);
    }
    Ok(worst / scale)
}

#[test]
fn shipped_state_decodes_exactly_like_the_original() -> Result<()> {
    let model = tiny_model();
    for (kv, encoding) in [(KvDtype::F32, StateEncoding::F32), (KvDtype::F16, StateEncoding::F16)] {
        let (mut original, chunks) = prefill_and_encode(&model, kv, encoding, SPEC)?;
        assert!(original.layers.iter().any(|l| !l.aux.is_empty()), "the schedule pruned something");
        let mut shipped = assemble(&model, kv, chunks)?;
        assert_eq!(shipped.kv_bytes(), original.kv_bytes());
        assert_eq!(shipped.computed_fraction(), original.computed_fraction());
        // Decoding revives pruned tokens from the shipped Aux Cache: bit-for-bit the same.
        assert_eq!(decode_both(&model, &mut original, &mut shipped)?, 0.0, "{encoding:?}");
        assert!(shipped.stats.revived > 0);
        assert_eq!(shipped.stats.revived, original.stats.revived);
    }
    Ok(())
}

#[test]
fn int8_state_is_smaller_and_close() -> Result<()> {
    let model = tiny_model();
    let payload = |chunks: &[StateChunk]| match &chunks.last().unwrap().part {
        Some(Part::Trailer(t)) => t.payload_bytes,
        _ => unreachable!(),
    };
    for spec in ["off", SPEC] {
        let (mut original, f16_chunks) = prefill_and_encode(&model, KvDtype::F16, StateEncoding::F16, spec)?;
        let (_, int8_chunks) = prefill_and_encode(&model, KvDtype::F16, StateEncoding::Int8, spec)?;
        let (int8, f16) = (payload(&int8_chunks), payload(&f16_chunks));
        assert!(int8 * 10 < f16 * 7, "{spec}: {int8} vs {f16} bytes");
        let mut shipped = assemble(&model, KvDtype::F16, int8_chunks)?;
        let worst = decode_both(&model, &mut original, &mut shipped)?;
        // Dense, the rounding error stays small. Pruned, it can change which tokens a
        // random model selects, so only decoding with revival is asked of it.
        if spec == "off" {
            assert!(worst > 0.0 && worst < 0.1, "int8 logits differ by {worst} of the largest");
        } else {
            assert!(shipped.stats.revived > 0);
        }
    }
    Ok(())
}

#[test]
fn truncated_corrupted_or_foreign_streams_are_refused() -> Result<()> {
    let model = tiny_model();
    let (_, chunks) = prefill_and_encode(&model, KvDtype::F16, StateEncoding::F16, SPEC)?;
    assert!(chunks.len() > 3);

    // Cut before the trailer, or a row chunk dropped from the middle.
    let cut = chunks[..chunks.len() - 1].to_vec();
    assert!(matches!(assemble(&model, KvDtype::F16, cut), Err(StateError::Truncated(_))));
    let mut missing = chunks.clone();
    missing.remove(2);
    assert!(matches!(assemble(&model, KvDtype::F16, missing), Err(StateError::Invalid(m)) if m.contains("trailer")));

    // One flipped byte fails the checksum.
    let mut corrupt = chunks.clone();
    if let Some(Part::Kv(rows)) = &mut corrupt[1].part {
        rows.k[7] ^= 0x10;
    } else {
        panic!("chunk 1 is K/V rows");
    }
    assert!(matches!(assemble(&model, KvDtype::F16, corrupt), Err(StateError::Invalid(m)) if m.contains("crc")));

    // Rows before the header, or for a different model.
    assert!(matches!(assemble(&model, KvDtype::F16, chunks[1..].to_vec()), Err(StateError::Invalid(_))));
    let mut asm = StateAssembler::new(model.config(), KvDtype::F16);
    assert!(matches!(asm.push(chunks[0].clone(), "another-model"), Err(StateError::Mismatch(_))));
    Ok(())
}
