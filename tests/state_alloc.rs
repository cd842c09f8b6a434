//! What hostile state chunks make the decoder allocate, measured by a counting global
//! allocator (this binary only): a header or row chunk that claims far more than the model
//! holds is refused before any buffer is sized from it, and no single allocation ever exceeds
//! the most one layer of a legitimate state needs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use lazyserve_model::{Config, KvDtype};
use lazyserve_proto::v1::state_chunk::Part;
use lazyserve_proto::v1::{KvRows, StateChunk, StateEncoding, StateHeader};
use lazyserve_state::StateAssembler;
use lazyserve_tests::{prefill_and_encode, tiny_model};
use prost::Message;

/// Counts the largest allocation of the thread that armed it, so that tests running in
/// parallel do not see each other's.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the allocator runs while thread-locals are torn down, too.
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `f`'s result and the largest single allocation it made.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, LARGEST.with(Cell::get))
}

/// The declared limit: the most one allocation of a legitimate state may take, a layer's K
/// (or V, or Aux Cache) buffer of one f32 row per token, with a Vec's doubling growth.
fn limit(cfg: &Config) -> usize {
    2 * cfg.max_position_embeddings * cfg.kv_dim().max(cfg.hidden_size) * 4
}

fn tiny_config() -> Config {
    tiny_model().config().clone()
}

fn header(tokens: Vec<u32>, num_layers: u32) -> StateChunk {
    let h = StateHeader {
        version: 1,
        sequence_id: "seq".into(),
        model: "tiny".into(),
        tokens,
        prune: "off".into(),
        sampling: Some(Default::default()),
        encoding: StateEncoding::F32 as i32,
        num_layers,
        kv_width: 32,
        hidden_size: 64,
        ttl_ms: 1000,
    };
    StateChunk { part: Some(Part::Header(h)) }
}

#[test]
fn the_measure_catches_an_oversized_allocation() {
    let cfg = tiny_config();
    let ((), largest) = largest_allocation(|| drop(std::hint::black_box(vec![0u8; limit(&cfg) + 1])));
    assert!(largest > limit(&cfg), "the control allocation of {} bytes was not seen ({largest})", limit(&cfg) + 1);
}

#[test]
fn hostile_headers_allocate_nothing_big() {
    let cfg = tiny_config();
    // A million tokens (4 MB, allocated here before measuring), and a header claiming
    // 4 billion layers: both refused without a buffer sized from them.
    for chunk in [header(vec![7; 1_000_000], 6), header(vec![7; 8], u32::MAX)] {
        let mut asm = StateAssembler::new(&cfg, KvDtype::F32);
        let (pushed, largest) = largest_allocation(|| asm.push(chunk, "tiny"));
        assert!(pushed.is_err());
        assert!(largest < 4096, "a refused header allocated {largest} bytes");
    }
}

#[test]
fn hostile_rows_allocate_nothing_big() {
    let cfg = tiny_config();
    let mut asm = StateAssembler::new(&cfg, KvDtype::F32);
    asm.push(header(vec![7; 8], 6), "tiny").expect("a valid header");
    // A million rows for an 8-token prompt, with payloads of the right size for them.
    let n = 1_000_000;
    let rows = KvRows { layer: 0, positions: vec![0; n], k: vec![0; n * 32 * 4], v: vec![0; n * 32 * 4], k_scales: vec![], v_scales: vec![] };
    let (pushed, largest) = largest_allocation(|| asm.push(StateChunk { part: Some(Part::Kv(rows)) }, "tiny"));
    assert!(pushed.is_err());
    assert!(largest < 4096, "refused rows allocated {largest} bytes");
}

#[test]
fn protobuf_that_claims_a_terabyte_allocates_nothing_big() {
    // StateChunk.kv (field 2), then KvRows.k (field 3) with a length prefix of 10^12 bytes.
    let mut bytes = vec![0x12, 0x0b, 0x1a];
    let mut len = 1_000_000_000_000u64;
    while len >= 0x80 {
        bytes.push(len as u8 | 0x80);
        len >>= 7;
    }
    bytes.push(len as u8);
    bytes.extend_from_slice(&[0; 4]);
    let (decoded, largest) = largest_allocation(|| StateChunk::decode(bytes.as_slice()));
    assert!(decoded.is_err());
    assert!(largest < 4096, "decoding allocated {largest} bytes");
}

#[test]
fn a_full_legitimate_state_stays_within_the_limit() -> anyhow::Result<()> {
    let model = tiny_model();
    let cfg = model.config().clone();
    let prompt: Vec<u32> = (0..cfg.max_position_embeddings as u32 - 1).map(|i| i % 101).collect();
    let (_, chunks) = prefill_and_encode(&model, KvDtype::F32, StateEncoding::F32, "2:0.5,4:0.5", &prompt)?;
    let mut asm = StateAssembler::new(&cfg, KvDtype::F32);
    let (pushed, largest) = largest_allocation(|| chunks.into_iter().try_for_each(|c| asm.push(c, "tiny")));
    pushed?;
    // The limit is not slack: a full state comes within a factor of eight of it.
    assert!(largest <= limit(&cfg) && largest * 8 > limit(&cfg), "largest allocation {largest}, limit {}", limit(&cfg));
    Ok(())
}
