//! Immutable columnar segments. A segment holds one shard's points by series, then by time:
//! a series is one combination of tag values, and a block holds the points of one series in
//! one aligned window of time ([`BLOCK_WINDOW_MS`]), at most `BLOCK_POINTS` of them. Each block
//! stores its columns apart: timestamps and numbers with `pco` (a numeric codec that finds
//! deltas and common bit patterns itself), dimension columns as a zstd-compressed dictionary
//! plus codes; the series' tags are kept once, in the footer.
//!
//! The footer is the segment's index: the series, each block's time range and a [`Summary`]
//! of its values (count, sums, min, max, first, last). A query finds the series it selects
//! through tag postings, skips blocks outside its range, and reads the summary instead of the
//! points of a block that lies wholly inside its time range and bucket.
//!
//! File: `MAGIC | block* | footer | footer_len u32 | footer_crc u32 | END_MAGIC`, every block
//! checked by its own crc32 on read. A mismatch is an error, never silently read. Segments of
//! the first format (`SHOALSG1`: blocks of mixed series by time, no summaries) still read.

use crate::model::batch::{Codes, DictColumn, NULL_CODE, RowBatch, RowBatchBuilder, Values};
use crate::model::summary::Summary;
use crate::model::{FieldClass, FieldValue, Key, Num};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC_V1: &[u8; 8] = b"SHOALSG1";
const MAGIC: &[u8; 8] = b"SHOALSG2";
const END_MAGIC: &[u8; 8] = b"SHOALEND";
pub const BLOCK_POINTS: usize = 16_384;
/// No block spans two of these windows (aligned to the epoch), so an aggregate by any whole
/// number of hours, or over whole hours, reads block summaries. An hour holds a few thousand
/// points of a series sampled every second, few enough that a query of the last minutes decodes
/// little it does not need, many enough that a block's fixed costs stay small.
pub const BLOCK_WINDOW_MS: i64 = 3_600_000;
const FOOTER_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Bound on a footer's decompressed size: guards against a corrupt length.
const FOOTER_DECODED_BYTES_MAX: usize = 512 * 1024 * 1024;
const PCO_LEVEL: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("segment {path} is corrupt: {what}")]
    Corrupt { path: String, what: String },
}

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:016}.seg"))
}

/// A series: its tag values by tag name (in name order). Every point of a block has these tags
/// and no other.
pub type Series = Vec<(String, FieldValue)>;

/// The series of a block of the first format, whose blocks mix series.
pub const NO_SERIES: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredBlockMeta", into = "StoredBlockMeta")]
pub struct BlockMeta {
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
    pub count: u32,
    pub min_ts: i64,
    pub max_ts: i64,
    /// Index into the segment's series, or [`NO_SERIES`].
    pub series: u32,
    /// The block's values summed up (see [`BlockMeta::summary`]); `None` in segments of the
    /// first format.
    summary: Option<BlockSummary>,
}

impl BlockMeta {
    /// The block's values summed up; `None` in segments of the first format.
    pub fn summary(&self) -> Option<Summary> {
        let s = self.summary.as_ref()?;
        let value = |i: usize| {
            let bits = s.values[i];
            if s.kinds & (1 << i) != 0 { Num::Dec(f64::from_bits(bits)) } else { Num::Int(bits as i64) }
        };
        Some(Summary {
            count: u64::from(self.count),
            int_sum: (i128::from(s.int_sum[1] as i64) << 64) | i128::from(s.int_sum[0]),
            dec_sum: s.dec_sum,
            any_dec: s.kinds & ANY_DECIMAL != 0,
            min: Some(value(0)),
            max: Some(value(1)),
            first: Some((self.min_ts, value(2))),
            last: Some((self.max_ts, value(3))),
        })
    }
}

/// A block's [`Summary`] as held in memory: its count and its first and last timestamps are
/// the block's own, and its four values are bits with their kinds in one byte. A segment of
/// 20,000 series holds 20,000 blocks, and a shard being loaded a dozen segments: the full
/// summaries made a block's metadata 176 bytes, these 120.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BlockSummary {
    /// The i128 sum as (low, high) halves: an i128 field would align the whole to 16 bytes.
    int_sum: [u64; 2],
    dec_sum: f64,
    /// min, max, first, last.
    values: [u64; 4],
    /// Bit i: `values[i]` is a decimal; [`ANY_DECIMAL`]: the block holds a decimal.
    kinds: u8,
}

const ANY_DECIMAL: u8 = 1 << 4;

impl BlockSummary {
    /// `summary` of a block of `count` points from `min_ts` to `max_ts`; `None` if it does not
    /// describe such a block (then the block is read rather than summed up).
    fn of(summary: &Summary, count: u32, min_ts: i64, max_ts: i64) -> Option<Self> {
        let (Some(min), Some(max), Some((first_ts, first)), Some((last_ts, last))) =
            (summary.min, summary.max, summary.first, summary.last)
        else {
            return None;
        };
        if summary.count != u64::from(count) || first_ts != min_ts || last_ts != max_ts {
            return None;
        }
        let mut kinds = if summary.any_dec { ANY_DECIMAL } else { 0 };
        let mut values = [0u64; 4];
        for (i, v) in [min, max, first, last].into_iter().enumerate() {
            values[i] = match v {
                Num::Int(n) => n as u64,
                Num::Dec(d) => {
                    kinds |= 1 << i;
                    d.to_bits()
                }
            };
        }
        let int_sum = [summary.int_sum as u64, (summary.int_sum >> 64) as u64];
        Some(Self { int_sum, dec_sum: summary.dec_sum, values, kinds })
    }
}

/// [`BlockMeta`] as the footer stores it, with the whole summary.
#[derive(Serialize, Deserialize)]
struct StoredBlockMeta {
    offset: u64,
    len: u64,
    crc: u32,
    count: u32,
    min_ts: i64,
    max_ts: i64,
    series: u32,
    summary: Option<Summary>,
}

impl From<StoredBlockMeta> for BlockMeta {
    fn from(b: StoredBlockMeta) -> Self {
        let summary = b.summary.as_ref().and_then(|s| BlockSummary::of(s, b.count, b.min_ts, b.max_ts));
        let StoredBlockMeta { offset, len, crc, count, min_ts, max_ts, series, .. } = b;
        Self { offset, len, crc, count, min_ts, max_ts, series, summary }
    }
}

impl From<BlockMeta> for StoredBlockMeta {
    fn from(b: BlockMeta) -> Self {
        let summary = b.summary();
        let BlockMeta { offset, len, crc, count, min_ts, max_ts, series, .. } = b;
        Self { offset, len, crc, count, min_ts, max_ts, series, summary }
    }
}

#[derive(Serialize, Deserialize)]
struct Footer {
    series: Vec<Series>,
    /// By series, then by time.
    blocks: Vec<BlockMeta>,
}

/// The footer of the first format.
#[derive(Deserialize)]
struct FooterV1 {
    blocks: Vec<BlockMetaV1>,
}

#[derive(Deserialize)]
struct BlockMetaV1 {
    offset: u64,
    len: u64,
    crc: u32,
    count: u32,
    min_ts: i64,
    max_ts: i64,
    _min_value: f64,
    _max_value: f64,
}

/// Which window of [`BLOCK_WINDOW_MS`] holds `ts`.
pub fn window_of(ts: i64) -> i64 {
    ts.div_euclid(BLOCK_WINDOW_MS)
}

/// A series as a map key.
pub type SeriesKey = Vec<(String, Key)>;

pub fn series_key(series: &Series) -> SeriesKey {
    series.iter().map(|(name, value)| (name.clone(), Key(value.clone()))).collect()
}

/// A block as stored: its byte strings are `Vec<u8>` when written and borrowed from the read
/// buffer when read (postcard encodes both alike; decoding into vectors went byte by byte).
#[derive(Serialize, Deserialize)]
struct EncodedBlock<B> {
    timestamps: B,
    /// One byte per row (0 = integer, 1 = decimal), zstd-compressed; empty when all integers.
    value_kinds: B,
    ints: B,
    decs: B,
    fields: Vec<EncodedField<B>>,
}

#[derive(Serialize, Deserialize)]
struct EncodedField<B> {
    name: String,
    class: FieldClass,
    dict: B,
    codes: B,
}

fn pco_compress<T: pco::data_types::Number>(nums: &[T], delta: pco::DeltaSpec) -> Vec<u8> {
    if nums.is_empty() {
        return Vec::new();
    }
    let config = pco::ChunkConfig::default().with_compression_level(PCO_LEVEL).with_delta_spec(delta);
    pco::standalone::simple_compress(nums, &config).expect("pco compresses any numbers")
}

/// Consecutive deltas when they span less than half the range of the values themselves (a
/// counter, a slow gauge: a bit or more saved per value), none otherwise (a noisy gauge).
/// pco's automatic choice compresses a sample under every candidate encoding, which took a
/// quarter of the load's CPU on blocks of a few dozen values.
fn delta_spec_of(nums: impl Iterator<Item = f64>) -> pco::DeltaSpec {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut step_lo, mut step_hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut previous = None;
    for x in nums {
        (lo, hi) = (lo.min(x), hi.max(x));
        if let Some(p) = previous {
            (step_lo, step_hi) = (step_lo.min(x - p), step_hi.max(x - p));
        }
        previous = Some(x);
    }
    if (step_hi - step_lo) * 2.0 < hi - lo { pco::DeltaSpec::TryConsecutive(1) } else { pco::DeltaSpec::NoOp }
}

/// Marks integers stored bit-packed (see [`pack_ints`]): pco's chunks begin with `pco!`.
const PACKED: u8 = b'B';

/// Blocks of at most this many integers are bit-packed rather than pco-compressed. pco's chunk
/// carries a header and bins that a few dozen values do not pay for (2.9 bytes a value against
/// 1.9 for 25 random 2-decimal readings), and building them took a tenth of the load's CPU: a
/// flush of a shard with many series writes blocks of a few dozen points each.
const PACKED_ROWS_MAX: usize = 64;

/// Integers as pco's chunk, or bit-packed when they are few ([`PACKED_ROWS_MAX`]).
fn compress_ints(ints: &[i64]) -> Vec<u8> {
    if ints.len() <= PACKED_ROWS_MAX {
        pack_ints(ints)
    } else {
        pco_compress(ints, delta_spec_of(ints.iter().map(|&i| i as f64)))
    }
}

fn decompress_ints(bytes: &[u8]) -> Result<Vec<i64>, String> {
    match bytes.split_first() {
        Some((&PACKED, rest)) => unpack_ints(rest),
        _ => pco_decompress(bytes),
    }
}

/// `PACKED`, then (postcard varints) whether the values are deltas, their count, the first
/// value, the smallest (value or delta) and the bit width, then each value's (or delta's)
/// excess over the smallest in that many bits, little-endian. Deltas where their spread is
/// narrower than the values' (a counter, a slow gauge).
fn pack_ints(ints: &[i64]) -> Vec<u8> {
    let Some(&first) = ints.first() else { return Vec::new() };
    let spread =
        |xs: &mut dyn Iterator<Item = i128>| xs.fold((i128::MAX, i128::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (lo, hi) = spread(&mut ints.iter().map(|&i| i128::from(i)));
    let deltas = || ints.windows(2).map(|w| i128::from(w[1]) - i128::from(w[0]));
    let (dlo, dhi) = if ints.len() > 1 { spread(&mut deltas()) } else { (0, 0) };
    let delta = dhi - dlo < hi - lo;
    let (base, span) = if delta { (dlo, dhi - dlo) } else { (lo, hi - lo) };
    // Values span at most 2^64 - 1 and deltas 2^65 - 2: a span past 64 bits keeps the values.
    let (delta, base, span) = if span > i128::from(u64::MAX) { (false, lo, hi - lo) } else { (delta, base, span) };
    let bits = 128 - (span as u128).leading_zeros();
    let mut out = vec![PACKED];
    out.extend(
        postcard::to_stdvec(&(delta, ints.len() as u32, first, base as i64, bits as u8)).expect("numbers encode"),
    );
    let mut packed = BitWriter { out, acc: 0, filled: 0 };
    if delta {
        deltas().for_each(|d| packed.push((d - base) as u64, bits));
    } else {
        ints.iter().for_each(|&i| packed.push((i128::from(i) - base) as u64, bits));
    }
    packed.finish()
}

fn unpack_ints(bytes: &[u8]) -> Result<Vec<i64>, String> {
    let ((delta, count, first, base, bits), packed): ((bool, u32, i64, i64, u8), &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| format!("packed integers: {e}"))?;
    let count = count as usize;
    if count == 0 || count > BLOCK_POINTS || bits > 64 {
        return Err(format!("{count} packed integers of {bits} bits"));
    }
    let packed_values = if delta { count - 1 } else { count };
    if packed.len() != (packed_values * usize::from(bits)).div_ceil(8) {
        return Err(format!("{} bytes for {packed_values} integers of {bits} bits", packed.len()));
    }
    let mut reader = BitReader { bytes: packed.iter(), acc: 0, filled: 0 };
    let mut out = Vec::with_capacity(count);
    if delta {
        let mut value = first;
        out.push(value);
        for _ in 1..count {
            value = value.wrapping_add(base.wrapping_add(reader.take(bits) as i64));
            out.push(value);
        }
    } else {
        out.extend((0..count).map(|_| base.wrapping_add(reader.take(bits) as i64)));
    }
    Ok(out)
}

/// Values of a fixed bit width, packed least significant bit first.
struct BitWriter {
    out: Vec<u8>,
    acc: u128,
    filled: u32,
}

impl BitWriter {
    fn push(&mut self, value: u64, bits: u32) {
        self.acc |= u128::from(value) << self.filled;
        self.filled += bits;
        while self.filled >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.filled -= 8;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    bytes: std::slice::Iter<'a, u8>,
    acc: u128,
    filled: u32,
}

impl BitReader<'_> {
    /// The next value of `bits` bits (the length was checked against the count beforehand).
    fn take(&mut self, bits: u8) -> u64 {
        let bits = u32::from(bits);
        while self.filled < bits {
            self.acc |= u128::from(*self.bytes.next().unwrap_or(&0)) << self.filled;
            self.filled += 8;
        }
        let value = (self.acc & ((1u128 << bits) - 1)) as u64;
        self.acc >>= bits;
        self.filled -= bits;
        value
    }
}

/// zstd at level 3 through one compression context per thread: a context is a few hundred KiB
/// to set up, and a segment compresses two or three small buffers per block.
fn zstd_compress(bytes: &[u8]) -> Vec<u8> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    CONTEXT.with(|context| {
        let mut context = context.borrow_mut();
        let context = context.get_or_insert_with(|| zstd::bulk::Compressor::new(3).expect("zstd level 3 exists"));
        context.compress(bytes).expect("in memory")
    })
}

/// Decompresses a zstd frame of at most `max` bytes through one context per thread (creating
/// a context per call cost a tenth of a query's time over many small blocks).
fn zstd_decompress(bytes: &[u8], max: usize) -> Result<Vec<u8>, String> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    let size = match zstd::zstd_safe::get_frame_content_size(bytes) {
        Ok(Some(size)) => size,
        Ok(None) => return Err("zstd frame without its size".into()),
        Err(_) => return Err("not a zstd frame".into()),
    };
    if size > max as u64 {
        return Err(format!("zstd frame of {size} bytes, more than {max}"));
    }
    CONTEXT.with(|context| {
        let mut context = context.borrow_mut();
        let context = match &mut *context {
            Some(c) => c,
            None => context.insert(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?),
        };
        context.decompress(bytes, size as usize).map_err(|e| e.to_string())
    })
}

/// The fewest bytes a non-empty dictionary and its codes take: two zstd frames of at least ten
/// bytes (magic, header, block header, content) and the codes' width byte.
const DICT_AND_CODES_BYTES_MIN: usize = 21;

/// Bound on a block's decompressed dictionary of one column.
const DICT_BYTES_MAX: usize = BLOCK_POINTS * (crate::model::STRING_VALUE_LEN_MAX + 16);

/// Timestamps as pco chunks with the encoding fixed (classic, first-order deltas) rather than
/// searched for: the search (multiples, delta orders) took two thirds of their encoding time and
/// found no smaller encoding for timestamps.
fn pco_compress_timestamps(timestamps: &[i64]) -> Vec<u8> {
    if timestamps.is_empty() {
        return Vec::new();
    }
    let config = pco::ChunkConfig::default()
        .with_compression_level(PCO_LEVEL)
        .with_mode_spec(pco::ModeSpec::Classic)
        .with_delta_spec(pco::DeltaSpec::TryConsecutive(1));
    pco::standalone::simple_compress(timestamps, &config).expect("pco compresses any numbers")
}

/// Dictionary codes, `NULL_CODE` as 0 and code `c` as `c + 1`, in the narrowest width that
/// holds them (1, 2 or 4 bytes, little-endian), zstd-compressed after a byte naming the width.
/// Tens of times faster than pco for these columns, whose few distinct values repeat in runs
/// and cycles that zstd finds as well. Segments written before hold pco chunks (they begin
/// with pco's magic, `pco!`), which [`decode_codes`] still reads.
fn encode_codes(codes: &[u32], dict_len: usize) -> Vec<u8> {
    let width: usize = match dict_len {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        _ => 4,
    };
    let mut raw = Vec::with_capacity(codes.len() * width);
    for &c in codes {
        let v = if c == NULL_CODE { 0 } else { c + 1 };
        raw.extend_from_slice(&v.to_le_bytes()[..width]);
    }
    let mut out = vec![width as u8];
    out.extend_from_slice(&zstd_compress(&raw));
    out
}

fn decode_codes(bytes: &[u8]) -> Result<Vec<u32>, String> {
    if bytes.starts_with(b"pco!") {
        return pco_decompress(bytes);
    }
    let Some((&width, compressed)) = bytes.split_first() else { return Ok(Vec::new()) };
    let width = width as usize;
    if !matches!(width, 1 | 2 | 4) {
        return Err(format!("unknown width {width} of dictionary codes"));
    }
    let raw = zstd_decompress(compressed, CODES_BYTES_MAX)?;
    if raw.len() % width != 0 {
        return Err(format!("{} bytes of codes of width {width}", raw.len()));
    }
    // One loop per width, so that each compiles to a plain widening loop.
    let codes = match width {
        1 => raw.iter().map(|&b| u32::from(b).wrapping_sub(1)).collect(),
        2 => raw.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])).wrapping_sub(1)).collect(),
        _ => raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]).wrapping_sub(1)).collect(),
    };
    Ok(codes)
}

/// Bound on a block's decompressed codes (4 bytes per row at most): guards against a corrupt
/// length.
const CODES_BYTES_MAX: usize = 4 * BLOCK_POINTS;

fn pco_decompress<T: pco::data_types::Number>(bytes: &[u8]) -> Result<Vec<T>, String> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    pco::standalone::simple_decompress(bytes).map_err(|e| e.to_string())
}

/// `value_kinds` of a block whose values are all decimal (a zstd frame is never one byte).
const ALL_DECIMAL: &[u8] = b"D";

/// Marks timestamps stored as (first, stride, count): pco's chunks begin with `pco!`.
const STRIDE: u8 = b'S';

/// Timestamps at a fixed stride (a scrape or a sensor's period) as three varints, where pco's
/// chunk header alone is larger; `None` when they are not.
fn encode_stride(timestamps: &[i64]) -> Option<Vec<u8>> {
    let (&first, &second) = (timestamps.first()?, timestamps.get(1)?);
    let stride = second.checked_sub(first)?;
    if !timestamps.windows(2).all(|w| w[1].checked_sub(w[0]) == Some(stride)) {
        return None;
    }
    let mut out = vec![STRIDE];
    out.extend(postcard::to_stdvec(&(first, stride, timestamps.len() as u32)).expect("numbers encode"));
    Some(out)
}

/// Marks decimals stored as integers scaled by a power of ten: pco's chunks begin with `pco!`.
const SCALED: u8 = b'E';

/// The most decimal places [`encode_decimals`] scales away (10^9 and every mantissa below
/// 2^53 are exact in an f64).
const SCALE_DIGITS_MAX: u8 = 9;

/// Literals, so that every build of both sides divides by the same numbers.
const POWERS_OF_TEN: [f64; SCALE_DIGITS_MAX as usize + 1] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Decimals that all have at most [`SCALE_DIGITS_MAX`] places (a reading like 12.34) as
/// `SCALED`, the digit count and the pco-compressed integers `value × 10^digits`: exact, since
/// both the check here and the decoding divide the same integer by the same power of ten, and
/// smaller than the floats (pco finds their common step only approximately, spending bits on
/// each value's correction). Any other block keeps its floats.
fn encode_decimals(decs: &[f64]) -> Vec<u8> {
    if decs.is_empty() {
        return Vec::new();
    }
    match scaled_decimals(decs) {
        Some((digits, mantissas)) => {
            let mut out = vec![SCALED, digits];
            out.extend(compress_ints(&mantissas));
            out
        }
        None => pco_compress(decs, delta_spec_of(decs.iter().copied())),
    }
}

/// The fewest decimal places that hold every one of `decs` exactly, and the values scaled by
/// them; `None` past [`SCALE_DIGITS_MAX`].
fn scaled_decimals(decs: &[f64]) -> Option<(u8, Vec<i64>)> {
    let scaled_by = |digits: u8| {
        let scale = POWERS_OF_TEN[usize::from(digits)];
        move |d: f64| {
            // Checked through the integer itself, as decoding computes it (-0.0 becomes 0).
            let m = (d * scale).round();
            let m = (m.abs() < (1u64 << 53) as f64).then_some(m as i64)?;
            ((m as f64 / scale).to_bits() == d.to_bits()).then_some(m)
        }
    };
    let mut digits = 0;
    for &d in decs {
        while scaled_by(digits)(d).is_none() {
            digits = (digits < SCALE_DIGITS_MAX).then_some(digits + 1)?;
        }
    }
    // A value that fit fewer places is checked again at the final count.
    let mantissas = decs.iter().map(|&d| scaled_by(digits)(d)).collect::<Option<Vec<i64>>>()?;
    Some((digits, mantissas))
}

fn decode_decimals(bytes: &[u8]) -> Result<Vec<f64>, String> {
    match bytes {
        [SCALED, digits, rest @ ..] if *digits <= SCALE_DIGITS_MAX => {
            let scale = POWERS_OF_TEN[usize::from(*digits)];
            let mantissas = decompress_ints(rest)?;
            Ok(mantissas.into_iter().map(|m| m as f64 / scale).collect())
        }
        [SCALED, digits, ..] => Err(format!("decimals scaled by 10^{digits}")),
        _ => pco_decompress(bytes),
    }
}

/// Timestamps at a fixed stride as three numbers, few others bit-packed, more as pco's chunk.
fn encode_timestamps(timestamps: &[i64]) -> Vec<u8> {
    match encode_stride(timestamps) {
        Some(stride) => stride,
        None if timestamps.len() <= PACKED_ROWS_MAX => pack_ints(timestamps),
        None => pco_compress_timestamps(timestamps),
    }
}

fn decode_timestamps(bytes: &[u8]) -> Result<Vec<i64>, String> {
    match bytes.split_first() {
        Some((&PACKED, rest)) => unpack_ints(rest),
        Some((&STRIDE, rest)) => {
            let (first, stride, count): (i64, i64, u32) = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
            if count as usize > BLOCK_POINTS {
                return Err(format!("{count} timestamps in one block"));
            }
            (0..i64::from(count))
                .map(|i| stride.checked_mul(i).and_then(|d| first.checked_add(d)))
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(|| "timestamps past the range of i64".to_string())
        }
        _ => pco_decompress(bytes),
    }
}

/// Marks a dictionary column stored as runs of integers (its `dict` is then empty, which a
/// dictionary never is).
const INT_RUNS: u8 = b'R';

/// A column of integers without nulls as runs (change from the previous run's value, length),
/// in varints. The write-time column is such: a few distinct times per block, in long runs,
/// where a dictionary and its codes cost a zstd frame each.
fn encode_int_runs(dict: &[FieldValue], codes: &[u32]) -> Option<Vec<u8>> {
    let mut runs: Vec<(i64, u32)> = Vec::new();
    let mut previous = 0i64;
    let mut current: Option<i64> = None;
    for &c in codes {
        let FieldValue::Int(v) = dict.get(c as usize)? else { return None };
        match runs.last_mut() {
            Some(run) if current == Some(*v) => run.1 += 1,
            _ => {
                runs.push((v.wrapping_sub(previous), 1));
                previous = *v;
                current = Some(*v);
            }
        }
    }
    let mut out = vec![INT_RUNS];
    out.extend(postcard::to_stdvec(&runs).expect("numbers encode"));
    Some(out)
}

/// Marks a dictionary column stored as a list of compressed integers (its `dict` is then
/// empty).
const INT_LIST: u8 = b'P';

/// A column of integers without nulls as [`INT_LIST`] and [`compress_ints`]' bytes: write
/// times that change from row to row (a series written one point per request) cost a byte a
/// row this way and three as runs.
fn encode_int_list(dict: &[FieldValue], codes: &[u32]) -> Option<Vec<u8>> {
    let ints = codes
        .iter()
        .map(|&c| match dict.get(c as usize) {
            Some(FieldValue::Int(v)) => Some(*v),
            _ => None,
        })
        .collect::<Option<Vec<i64>>>()?;
    let mut out = vec![INT_LIST];
    out.extend(compress_ints(&ints));
    Some(out)
}

/// The dictionary and codes of a column stored by [`encode_int_runs`] or [`encode_int_list`].
fn decode_int_column(bytes: &[u8]) -> Result<(Vec<FieldValue>, Vec<u32>), String> {
    let (mut dict, mut codes) = (Vec::new(), Vec::new());
    let mut seen: HashMap<i64, u32> = HashMap::new();
    let mut push = |value: i64, len: usize| {
        let code = *seen.entry(value).or_insert_with(|| {
            dict.push(FieldValue::Int(value));
            dict.len() as u32 - 1
        });
        codes.extend(std::iter::repeat_n(code, len));
    };
    match bytes.split_first() {
        Some((&INT_RUNS, rest)) => {
            let runs: Vec<(i64, u32)> = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
            if runs.iter().map(|r| r.1 as usize).sum::<usize>() > BLOCK_POINTS {
                return Err("more runs than a block holds".into());
            }
            let mut value = 0i64;
            for (change, len) in runs {
                value = value.wrapping_add(change);
                push(value, len as usize);
            }
        }
        Some((&INT_LIST, rest)) => {
            let ints = decompress_ints(rest)?;
            if ints.len() > BLOCK_POINTS {
                return Err("more integers than a block holds".into());
            }
            for value in ints {
                push(value, 1);
            }
        }
        _ => return Err("an integer column of no known form".into()),
    }
    Ok((dict, codes))
}

/// Encodes `rows` of `batch` (one series) as a block: the tag columns stay out (the footer
/// holds the series' tags once).
fn encode_block(batch: &RowBatch, rows: &[usize]) -> EncodedBlock<Vec<u8>> {
    let timestamps: Vec<i64> = rows.iter().map(|&r| batch.timestamps[r]).collect();
    let mut kinds = Vec::with_capacity(rows.len());
    let (mut ints, mut decs) = (Vec::new(), Vec::new());
    for &r in rows {
        match batch.values.get(r) {
            Num::Int(i) => {
                kinds.push(0u8);
                ints.push(i);
            }
            Num::Dec(d) => {
                kinds.push(1u8);
                decs.push(d);
            }
        }
    }
    let value_kinds = match (ints.is_empty(), decs.is_empty()) {
        (_, true) => Vec::new(),
        (true, false) => ALL_DECIMAL.to_vec(),
        (false, false) => zstd_compress(&kinds),
    };
    let mut fields = Vec::new();
    for (name, col) in batch.columns.iter().filter(|(_, col)| col.class != Some(FieldClass::Tag)) {
        // Re-number the dictionary to the values these rows use, so blocks stay self-contained.
        let mut remap = vec![u32::MAX; col.dict.len()];
        let mut dict = Vec::new();
        let mut codes = Vec::with_capacity(rows.len());
        for &r in rows {
            let c = col.codes.get(r);
            if c == NULL_CODE {
                codes.push(c);
                continue;
            }
            if remap[c as usize] == u32::MAX {
                remap[c as usize] = dict.len() as u32;
                dict.push(col.dict[c as usize].clone());
            }
            codes.push(remap[c as usize]);
        }
        if dict.is_empty() {
            continue;
        }
        // An integer column as runs, or as a list where runs are short (a list costs time, and
        // a sixth of a byte a row at least); as a dictionary and codes only when that is smaller.
        let runs = encode_int_runs(&dict, &codes);
        let list =
            runs.as_ref().filter(|runs| runs.len() > rows.len() / 4).and_then(|_| encode_int_list(&dict, &codes));
        let ints = [runs, list].into_iter().flatten().min_by_key(Vec::len);
        let (dict, codes) = match ints {
            // No dictionary is smaller: the write times of a flush take no zstd at all.
            Some(ints) if ints.len() < DICT_AND_CODES_BYTES_MIN => (Vec::new(), ints),
            ints => {
                let dict_bytes = zstd_compress(&postcard::to_stdvec(&dict).expect("values encode"));
                let codes = encode_codes(&codes, dict.len());
                match ints {
                    Some(ints) if ints.len() < dict_bytes.len() + codes.len() => (Vec::new(), ints),
                    _ => (dict_bytes, codes),
                }
            }
        };
        let field = EncodedField { name: name.clone(), class: col.class.unwrap_or(FieldClass::Dimension), dict, codes };
        fields.push(field);
    }
    EncodedBlock {
        timestamps: encode_timestamps(&timestamps),
        value_kinds,
        ints: compress_ints(&ints),
        decs: encode_decimals(&decs),
        fields,
    }
}

/// Writes `batch` (any order) as a new segment at `path`, fsynced, and returns it open
/// (sharing series with `like`, see [`Segment::open_sharing`]).
pub fn write_segment(path: &Path, seq: u64, batch: &RowBatch, like: Option<&Segment>) -> Result<Segment, SegmentError> {
    let mut writer = SegmentWriter::create(path)?;
    writer.add_rows(batch)?;
    writer.finish(seq, like)
}

/// Each row's series, numbered from 0 in the order of first appearance, and how many there are.
/// One pass per tag column pairs the series so far with the column's code (no key per row).
fn series_of_rows(batch: &RowBatch) -> (Vec<u32>, usize) {
    let mut ids = vec![0u32; batch.len()];
    let mut count = usize::from(!batch.is_empty());
    for col in batch.columns.values().filter(|col| col.class == Some(FieldClass::Tag)) {
        // A missing value is one more code.
        let width = col.dict.len() + 1;
        let code = |r: usize| match col.codes.get(r) {
            NULL_CODE => col.dict.len(),
            c => c as usize,
        };
        let mut next = 0u32;
        if count * width <= 1 << 22 {
            let mut dense = vec![u32::MAX; count * width];
            for (r, id) in ids.iter_mut().enumerate() {
                let slot = &mut dense[*id as usize * width + code(r)];
                if *slot == u32::MAX {
                    *slot = next;
                    next += 1;
                }
                *id = *slot;
            }
        } else {
            let mut pairs: HashMap<(u32, usize), u32> = HashMap::new();
            for (r, id) in ids.iter_mut().enumerate() {
                let fresh = pairs.len() as u32;
                *id = *pairs.entry((*id, code(r))).or_insert(fresh);
            }
            next = pairs.len() as u32;
        }
        count = next as usize;
    }
    (ids, count)
}

/// The tags of row `r` of `batch`.
pub fn series_of_row(batch: &RowBatch, r: usize) -> Series {
    batch
        .columns
        .iter()
        .filter(|(_, col)| col.class == Some(FieldClass::Tag))
        .filter_map(|(name, col)| col.get(r).map(|v| (name.clone(), v.clone())))
        .collect()
}

/// Builds a segment file block by block: from rows (grouped by series, sorted by time and
/// encoded here) or from blocks of other segments copied as they are (a merge of segments that
/// share no series' window costs a copy, not a decode and re-encode). The file appears under
/// its name only once complete and fsynced.
pub struct SegmentWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: std::io::BufWriter<File>,
    offset: u64,
    blocks: Vec<BlockMeta>,
    series: Vec<Series>,
    /// The id of each series in `series` by a hash of its tags ([`series_hash`]); ids whose
    /// series' hash another series took first are in `collided`. (Keyed by the series
    /// themselves, each lookup built a key of copied strings: a twentieth of a load's CPU.)
    series_ids: HashMap<u64, u32>,
    collided: Vec<u32>,
    /// Seeded per writer, so that tags cannot be chosen to collide.
    hasher: foldhash::fast::RandomState,
}

impl SegmentWriter {
    pub fn create(path: &Path) -> Result<Self, SegmentError> {
        let tmp = path.with_extension("tmp");
        let file = File::create(&tmp).map_err(|source| SegmentError::Io { path: tmp.display().to_string(), source })?;
        let mut writer = Self {
            path: path.to_path_buf(),
            tmp,
            file: std::io::BufWriter::new(file),
            offset: 0,
            blocks: Vec::new(),
            series: Vec::new(),
            series_ids: HashMap::new(),
            collided: Vec::new(),
            hasher: Default::default(),
        };
        writer.write(MAGIC)?;
        Ok(writer)
    }

    fn io(&self, source: std::io::Error) -> SegmentError {
        SegmentError::Io { path: self.path.display().to_string(), source }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), SegmentError> {
        crate::env::write_file(&mut self.file, &self.tmp, bytes).map_err(|e| self.io(e))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn series_id(&mut self, series: std::borrow::Cow<'_, Series>) -> u32 {
        let same = |id: &u32| cmp_series(&self.series[*id as usize], &series).is_eq();
        let hash = series_hash(&self.hasher, &series);
        let found = match self.series_ids.get(&hash) {
            Some(id) if same(id) => Some(*id),
            Some(_) => self.collided.iter().copied().find(|id| same(id)),
            None => None,
        };
        if let Some(id) = found {
            return id;
        }
        let id = self.series.len() as u32;
        match self.series_ids.entry(hash) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(id);
            }
            std::collections::hash_map::Entry::Occupied(_) => self.collided.push(id),
        }
        self.series.push(series.into_owned());
        id
    }

    /// Appends the rows of `batch` (any order) as blocks of one series and window each.
    pub fn add_rows(&mut self, batch: &RowBatch) -> Result<(), SegmentError> {
        let (row_series, count) = series_of_rows(batch);
        // Rows by series (a counting sort), then by time within each series: points mostly
        // arrive in time order, so the second sort is mostly a check.
        let mut starts = vec![0usize; count + 1];
        for &s in &row_series {
            starts[s as usize + 1] += 1;
        }
        for i in 0..count {
            starts[i + 1] += starts[i];
        }
        let mut placed = starts.clone();
        let mut order = vec![0usize; batch.len()];
        for (r, &s) in row_series.iter().enumerate() {
            order[placed[s as usize]] = r;
            placed[s as usize] += 1;
        }
        for s in 0..count {
            let rows = &mut order[starts[s]..starts[s + 1]];
            if !rows.is_sorted_by_key(|&r| batch.timestamps[r]) {
                rows.sort_by_key(|&r| (batch.timestamps[r], r));
            }
            let series = self.series_id(std::borrow::Cow::Owned(series_of_row(batch, rows[0])));
            let mut begin = 0;
            while begin < rows.len() {
                let window = window_of(batch.timestamps[rows[begin]]);
                let end = (begin..rows.len().min(begin + BLOCK_POINTS))
                    .find(|&i| window_of(batch.timestamps[rows[i]]) != window)
                    .unwrap_or(rows.len().min(begin + BLOCK_POINTS));
                self.add_block(batch, &rows[begin..end], series)?;
                begin = end;
            }
        }
        Ok(())
    }

    fn add_block(&mut self, batch: &RowBatch, rows: &[usize], series: u32) -> Result<(), SegmentError> {
        let bytes = postcard::to_stdvec(&encode_block(batch, rows)).expect("block encodes");
        let mut summary = Summary::default();
        for &r in rows {
            summary.add(batch.timestamps[r], batch.values.get(r));
        }
        let (count, min_ts) = (rows.len() as u32, batch.timestamps[rows[0]]);
        let max_ts = batch.timestamps[*rows.last().expect("blocks are non-empty")];
        self.blocks.push(BlockMeta {
            offset: self.offset,
            len: bytes.len() as u64,
            crc: crc32fast::hash(&bytes),
            count,
            min_ts,
            max_ts,
            series,
            summary: BlockSummary::of(&summary, count, min_ts, max_ts),
        });
        self.write(&bytes)
    }

    /// Appends block `meta` of segment `from` as it is, after checking its checksum (a merge
    /// never carries a corrupt block on under a new name). Only blocks of one series copy.
    pub fn copy_block(&mut self, from: &Segment, meta: &BlockMeta) -> Result<(), SegmentError> {
        let Some(series) = from.series(meta.series) else {
            return Err(SegmentError::Corrupt {
                path: from.path.display().to_string(),
                what: format!("block at {} names no series to copy", meta.offset),
            });
        };
        let series = self.series_id(std::borrow::Cow::Borrowed(series));
        let bytes = from.read_block_bytes(meta)?;
        self.blocks.push(BlockMeta { offset: self.offset, series, ..meta.clone() });
        self.write(&bytes)
    }

    /// Whether no block was added.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Gives up the file being written.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }

    /// Writes the footer (series in order, blocks by series then time), fsyncs and renames the
    /// file into place; returns the segment open as [`Segment::open_sharing`] would, from the
    /// footer in hand (reading back and decoding a footer of 20,000 series was a twentieth of
    /// the load's CPU).
    pub fn finish(mut self, seq: u64, like: Option<&Segment>) -> Result<Segment, SegmentError> {
        // Series ids in the order of their keys, so that a segment's bytes depend only on its
        // points.
        let mut by_key: Vec<u32> = (0..self.series.len() as u32).collect();
        by_key.sort_by(|&a, &b| cmp_series(&self.series[a as usize], &self.series[b as usize]));
        let mut renumber = vec![0u32; self.series.len()];
        for (new, &old) in by_key.iter().enumerate() {
            renumber[old as usize] = new as u32;
        }
        let mut series = vec![Series::new(); self.series.len()];
        for (old, s) in std::mem::take(&mut self.series).into_iter().enumerate() {
            series[renumber[old] as usize] = s;
        }
        let mut blocks = std::mem::take(&mut self.blocks);
        for b in &mut blocks {
            b.series = renumber[b.series as usize];
        }
        blocks.sort_by_key(|b| (b.series, b.min_ts, b.offset));
        let footer = Footer { series, blocks };
        let footer_bytes = zstd_compress(&postcard::to_stdvec(&footer).expect("footer encodes"));
        self.write(&footer_bytes)?;
        self.write(&(footer_bytes.len() as u32).to_le_bytes())?;
        self.write(&crc32fast::hash(&footer_bytes).to_le_bytes())?;
        self.write(END_MAGIC)?;
        let file = self
            .file
            .into_inner()
            .map_err(|e| SegmentError::Io { path: self.path.display().to_string(), source: e.into_error() })?;
        let io = |source| SegmentError::Io { path: self.path.display().to_string(), source };
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io)?;
        // Reads go through a handle opened for reading, as for any segment.
        let file = File::open(&self.path).map_err(io)?;
        Segment::of_footer(&self.path, seq, file, footer, like)
    }
}

/// Most segment files held open at once by the whole process. A node with many shards has
/// many segments; each keeps only its footer in memory and borrows a file handle from this
/// cache for its reads, reopening the file when the handle was evicted.
pub const OPEN_SEGMENT_FILES_MAX: usize = 1024;

/// The open segment files, by [`Segment::id`], evicted oldest first.
struct OpenFiles {
    files: std::collections::BTreeMap<u64, std::sync::Arc<File>>,
    order: std::collections::VecDeque<u64>,
}

static OPEN_FILES: std::sync::Mutex<OpenFiles> = std::sync::Mutex::new(OpenFiles {
    files: std::collections::BTreeMap::new(),
    order: std::collections::VecDeque::new(),
});
static NEXT_SEGMENT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Keeps `file` as segment `id`'s handle, evicting the oldest past the bound (a reader still
/// using an evicted handle keeps it open until it is done).
fn keep_open(id: u64, file: std::sync::Arc<File>) {
    let mut open = OPEN_FILES.lock().expect("open segment files lock");
    if open.files.insert(id, file).is_none() {
        open.order.push_back(id);
    }
    while open.files.len() > OPEN_SEGMENT_FILES_MAX {
        let Some(oldest) = open.order.pop_front() else { break };
        open.files.remove(&oldest);
    }
}

/// How many segment files are open now (for `GET /metrics` and tests).
pub fn open_segment_files() -> usize {
    OPEN_FILES.lock().expect("open segment files lock").files.len()
}

/// An open segment: its footer in memory, blocks read on demand.
pub struct Segment {
    pub seq: u64,
    pub path: PathBuf,
    /// This segment's key in the cache of open files: unique in the process, so a segment
    /// written again at the same path (a metric dropped and created again) never reads
    /// through the old file's handle.
    id: u64,
    pub blocks: Vec<BlockMeta>,
    /// Bytes of its blocks (the footer aside), summed once: idle shards are checked for a
    /// merge at every flush tick.
    pub block_bytes: u64,
    index: SeriesIndex,
    /// Set once a compaction replaced this segment: its file goes when the last reader is
    /// done with it (a running scan may need to reopen it after its handle was evicted).
    retired: std::sync::atomic::AtomicBool,
    /// The file's (device, inode), to recognise it at removal.
    inode: (u64, u64),
}

/// A segment's series and where their blocks are: the series index of its shard's data on
/// disk.
#[derive(Default)]
struct SeriesIndex {
    /// Shared with the segment opened alongside where equal (see [`Segment::open_sharing`]).
    series: Vec<std::sync::Arc<Series>>,
    /// Blocks of series `i`: `blocks[ranges[i]]` (the footer keeps blocks by series).
    ranges: Vec<Range<usize>>,
    /// Blocks of the first format, which belong to no one series.
    unsorted: Range<usize>,
    /// Tag name → the series holding it, by value then id: a value's series are one run
    /// found by binary search. (A map of values to id lists held a copy of every value and a
    /// list per value: a third of a many-series segment's memory.) Shared with the segment
    /// opened alongside when both hold the very same series.
    postings: std::sync::Arc<HashMap<String, Vec<u32>>>,
}

/// The order of two series' keys ([`series_key`]), without building them.
fn cmp_series(a: &Series, b: &Series) -> std::cmp::Ordering {
    a.iter()
        .zip(b)
        .map(|((an, av), (bn, bv))| an.cmp(bn).then_with(|| crate::model::cmp_values(av, bv)))
        .find(|o| o.is_ne())
        .unwrap_or_else(|| a.len().cmp(&b.len()))
}

/// A hash of a series' tags that agrees with [`cmp_series`]: equal series (same names, same
/// kinds and bits of values) hash alike.
fn series_hash(state: &impl std::hash::BuildHasher, series: &Series) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = state.build_hasher();
    for (name, value) in series {
        name.hash(&mut h);
        match value {
            FieldValue::Str(s) => (0u8, s).hash(&mut h),
            FieldValue::Int(i) => (1u8, i).hash(&mut h),
            FieldValue::Dec(d) => (2u8, d.to_bits()).hash(&mut h),
        }
    }
    h.finish()
}

/// `series` (sorted by key, as footers keep them), each taken from `shared` (sorted too) where
/// that holds an identical one.
fn share_series(series: Vec<Series>, shared: &[std::sync::Arc<Series>]) -> Vec<std::sync::Arc<Series>> {
    let by_key = cmp_series;
    let mut next = 0;
    series
        .into_iter()
        .map(|s| {
            while next < shared.len() && by_key(&shared[next], &s).is_lt() {
                next += 1;
            }
            match shared.get(next) {
                Some(same) if **same == s => same.clone(),
                _ => std::sync::Arc::new(s),
            }
        })
        .collect()
}

/// Per tag name, the series holding it by value then id.
fn postings_of(series: &[std::sync::Arc<Series>]) -> HashMap<String, Vec<u32>> {
    let mut postings: HashMap<String, Vec<u32>> = HashMap::new();
    for (id, tags) in series.iter().enumerate() {
        for (name, _) in tags.iter() {
            postings.entry(name.clone()).or_default().push(id as u32);
        }
    }
    for (name, ids) in &mut postings {
        let value = |id: u32| tag_value(&series[id as usize], name).expect("listed under its tags");
        ids.sort_by(|&a, &b| crate::model::cmp_values(value(a), value(b)).then(a.cmp(&b)));
        ids.shrink_to_fit();
    }
    postings
}

/// The value of tag `name` in `series`.
fn tag_value<'a>(series: &'a Series, name: &str) -> Option<&'a FieldValue> {
    series.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

impl SeriesIndex {
    /// The index of a segment with these series and blocks; `like`, the index of another
    /// segment of the shard, lends its postings when its series are the same ones (segments
    /// flushed one after the other during a load: sorting 20,000 series by each tag's value
    /// for every one of them was a seventieth of the load's CPU).
    fn of(
        series: Vec<std::sync::Arc<Series>>,
        blocks: &[BlockMeta],
        like: Option<&SeriesIndex>,
    ) -> Result<Self, String> {
        let mut ranges = vec![0..0; series.len()];
        let unsorted_from = blocks.partition_point(|b| b.series != NO_SERIES);
        if blocks[unsorted_from..].iter().any(|b| b.series != NO_SERIES) {
            return Err("blocks are out of series order".into());
        }
        let mut i = 0;
        while i < unsorted_from {
            let id = blocks[i].series;
            let end = i + blocks[i..unsorted_from].partition_point(|b| b.series == id);
            let Some(range) = ranges.get_mut(id as usize) else {
                return Err(format!("a block names series {id} of {}", series.len()));
            };
            if range.start != range.end {
                return Err("blocks are out of series order".into());
            }
            *range = i..end;
            i = end;
        }
        let same_series = like.filter(|like| {
            like.series.len() == series.len()
                && like.series.iter().zip(&series).all(|(a, b)| std::sync::Arc::ptr_eq(a, b))
        });
        let postings = match same_series {
            Some(like) => like.postings.clone(),
            None => std::sync::Arc::new(postings_of(&series)),
        };
        Ok(Self { series, ranges, unsorted: unsorted_from..blocks.len(), postings })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        {
            let mut open = OPEN_FILES.lock().expect("open segment files lock");
            if open.files.remove(&self.id).is_some() {
                let id = self.id;
                open.order.retain(|o| *o != id);
            }
        }
        // Only this segment's own file: the path may hold a newer one by now (its metric
        // dropped and created again while a scan still held this segment).
        use std::os::unix::fs::MetadataExt;
        if self.retired.load(std::sync::atomic::Ordering::SeqCst)
            && std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Segment {
    pub fn open(path: &Path, seq: u64) -> Result<Self, SegmentError> {
        Self::open_sharing(path, seq, None)
    }

    /// Opens a segment, sharing the series it has in common with `like` (another segment of
    /// its shard): a shard's segments mostly hold the same series, and each kept its own copy
    /// (4 MB for 20,000 series, ten segments before a merge). Both series tables are sorted
    /// by key, so one pass pairs them.
    pub fn open_sharing(path: &Path, seq: u64, like: Option<&Segment>) -> Result<Self, SegmentError> {
        let p = path.display().to_string();
        let corrupt = |what: &str| SegmentError::Corrupt { path: p.clone(), what: what.into() };
        let io = |source| SegmentError::Io { path: p.clone(), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let trailer = 16u64;
        if len < MAGIC.len() as u64 + trailer {
            return Err(corrupt("too short"));
        }
        let mut head = [0u8; 8];
        file.read_exact_at(&mut head, 0).map_err(io)?;
        let mut tail = [0u8; 16];
        file.read_exact_at(&mut tail, len - trailer).map_err(io)?;
        if &tail[8..] != END_MAGIC {
            return Err(corrupt("missing end marker"));
        }
        let footer_len = u32::from_le_bytes(tail[0..4].try_into().expect("4")) as u64;
        let footer_crc = u32::from_le_bytes(tail[4..8].try_into().expect("4"));
        if footer_len > FOOTER_BYTES_MAX || footer_len + trailer + MAGIC.len() as u64 > len {
            return Err(corrupt("bad footer length"));
        }
        let mut footer = vec![0u8; footer_len as usize];
        file.read_exact_at(&mut footer, len - trailer - footer_len).map_err(io)?;
        if crc32fast::hash(&footer) != footer_crc {
            return Err(corrupt("footer checksum mismatch"));
        }
        let footer = match &head {
            MAGIC => {
                let bytes =
                    zstd_decompress(&footer, FOOTER_DECODED_BYTES_MAX).map_err(|e| corrupt(&format!("footer: {e}")))?;
                postcard::from_bytes::<Footer>(&bytes).map_err(|e| corrupt(&format!("footer: {e}")))?
            }
            MAGIC_V1 => {
                let old: FooterV1 = postcard::from_bytes(&footer).map_err(|e| corrupt(&format!("footer: {e}")))?;
                let blocks = old
                    .blocks
                    .into_iter()
                    .map(|b| BlockMeta {
                        offset: b.offset,
                        len: b.len,
                        crc: b.crc,
                        count: b.count,
                        min_ts: b.min_ts,
                        max_ts: b.max_ts,
                        series: NO_SERIES,
                        summary: None,
                    })
                    .collect();
                Footer { series: Vec::new(), blocks }
            }
            _ => return Err(corrupt("not a segment (unknown magic)")),
        };
        // Every block lies between the magic and the footer: a footer naming bytes beyond them
        // would make a read allocate whatever length it claims.
        let blocks_end = len - trailer - footer_len;
        if footer
            .blocks
            .iter()
            .any(|b| b.offset < MAGIC.len() as u64 || b.offset.checked_add(b.len).is_none_or(|end| end > blocks_end))
        {
            return Err(corrupt("a block lies outside the file"));
        }
        Self::of_footer(path, seq, file, footer, like)
    }

    /// The segment at `path` (open as `file`) whose footer is `footer`.
    fn of_footer(
        path: &Path,
        seq: u64,
        file: File,
        footer: Footer,
        like: Option<&Segment>,
    ) -> Result<Self, SegmentError> {
        let p = path.display().to_string();
        let metadata = file.metadata().map_err(|source| SegmentError::Io { path: p.clone(), source })?;
        let inode = {
            use std::os::unix::fs::MetadataExt;
            (metadata.dev(), metadata.ino())
        };
        let series = share_series(footer.series, like.map_or(&[], |l| l.index.series.as_slice()));
        let index = SeriesIndex::of(series, &footer.blocks, like.map(|l| &l.index))
            .map_err(|what| SegmentError::Corrupt { path: p, what })?;
        let id = NEXT_SEGMENT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        keep_open(id, std::sync::Arc::new(file));
        let block_bytes = footer.blocks.iter().map(|b| b.len).sum();
        // Kept as long as the segment: without the room a growing vector leaves (a writer's
        // doubling, or serde's from a footer read), a 20,000-series segment holds 2.4 MB of
        // block metadata instead of up to 4.2, and a shard being loaded holds a dozen.
        let mut blocks = footer.blocks;
        blocks.shrink_to_fit();
        Ok(Self { seq, path: path.to_path_buf(), id, blocks, block_bytes, index, retired: Default::default(), inode })
    }

    /// The tags of series `id` (`None` for [`NO_SERIES`]).
    pub fn series(&self, id: u32) -> Option<&Series> {
        self.index.series.get(id as usize).map(|s| &**s)
    }

    pub fn series_count(&self) -> usize {
        self.index.series.len()
    }

    /// Whether some series of this segment has tag `name` (then a series without it has no
    /// value for it in any row).
    pub fn has_tag(&self, name: &str) -> bool {
        self.index.postings.contains_key(name)
    }

    /// The series whose tag `name` is `value`, ascending; `None` when no series has the tag.
    pub fn series_with(&self, name: &str, value: &FieldValue) -> Option<&[u32]> {
        let ids = self.index.postings.get(name)?;
        let of = |id: &u32| tag_value(&self.index.series[*id as usize], name).expect("listed under its tags");
        let from = ids.partition_point(|id| crate::model::cmp_values(of(id), value).is_lt());
        let to = from + ids[from..].partition_point(|id| crate::model::cmp_values(of(id), value).is_le());
        Some(&ids[from..to])
    }

    /// The blocks of the given series (ascending ids), each series' in time order; with
    /// `None`, every block. Blocks of the first format belong to every selection.
    pub fn blocks_of<'a>(&'a self, series: Option<&'a [u32]>) -> Box<dyn Iterator<Item = &'a BlockMeta> + 'a> {
        match series {
            None => Box::new(self.blocks.iter()),
            Some(ids) => Box::new(
                ids.iter()
                    .filter_map(|&id| self.index.ranges.get(id as usize))
                    .flat_map(|range| &self.blocks[range.clone()])
                    .chain(&self.blocks[self.index.unsorted.clone()]),
            ),
        }
    }

    /// Whether block `meta` may hold row `r` of `batch`: its series has the row's tags.
    pub fn may_hold(&self, meta: &BlockMeta, batch: &RowBatch, r: usize) -> bool {
        let Some(series) = self.series(meta.series) else { return true };
        let mut tags = batch
            .columns
            .iter()
            .filter(|(_, col)| col.class == Some(FieldClass::Tag))
            .filter_map(|(name, col)| col.get(r).map(|v| (name, v)));
        let mut expected = series.iter();
        loop {
            match (tags.next(), expected.next()) {
                (None, None) => return true,
                (Some((name, value)), Some((tag, tag_value))) if name == tag && value == tag_value => {}
                _ => return false,
            }
        }
    }

    /// Marks the file for removal once no reader holds this segment any more.
    pub fn retire(&self) {
        self.retired.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn points(&self) -> u64 {
        self.blocks.iter().map(|b| u64::from(b.count)).sum()
    }

    /// Decodes one block. `columns`: the dimension/tag columns to decode (`None` = all).
    pub fn read_block(&self, meta: &BlockMeta, columns: Option<&[String]>) -> Result<RowBatch, SegmentError> {
        let corrupt = |what: String| SegmentError::Corrupt { path: self.path.display().to_string(), what };
        let bytes = self.read_block_bytes(meta)?;
        let block: EncodedBlock<&[u8]> = postcard::from_bytes(&bytes).map_err(|e| corrupt(format!("block: {e}")))?;
        let timestamps: Vec<i64> = decode_timestamps(block.timestamps).map_err(corrupt)?;
        let ints = decompress_ints(block.ints).map_err(corrupt)?;
        let decs: Vec<f64> = decode_decimals(block.decs).map_err(corrupt)?;
        let values: Values = if block.value_kinds.is_empty() {
            ints.into_iter().map(Num::Int).collect()
        } else if block.value_kinds == ALL_DECIMAL {
            decs.into_iter().map(Num::Dec).collect()
        } else {
            let kinds = zstd_decompress(block.value_kinds, BLOCK_POINTS).map_err(corrupt)?;
            let (mut i, mut d) = (ints.into_iter(), decs.into_iter());
            kinds
                .iter()
                .map(|k| if *k == 0 { i.next().map(Num::Int) } else { d.next().map(Num::Dec) })
                .collect::<Option<Values>>()
                .ok_or_else(|| corrupt("value columns disagree".into()))?
        };
        if values.len() != timestamps.len() || timestamps.len() != meta.count as usize {
            return Err(corrupt("column lengths disagree".into()));
        }
        let mut batch = RowBatch { timestamps, values, columns: Default::default() };
        for f in block.fields {
            if columns.is_some_and(|cols| !cols.contains(&f.name)) {
                continue;
            }
            let (dict, codes) = if f.dict.is_empty() {
                decode_int_column(f.codes).map_err(corrupt)?
            } else {
                let dict_bytes = zstd_decompress(f.dict, DICT_BYTES_MAX).map_err(corrupt)?;
                let dict: Vec<FieldValue> = postcard::from_bytes(&dict_bytes).map_err(|e| corrupt(e.to_string()))?;
                (dict, decode_codes(f.codes).map_err(corrupt)?)
            };
            if codes.len() != batch.len() || codes.iter().any(|&c| c != NULL_CODE && c as usize >= dict.len()) {
                return Err(corrupt(format!("column {} is inconsistent", f.name)));
            }
            batch.columns.insert(f.name, DictColumn { class: Some(f.class), dict, codes: Codes::U32(codes) });
        }
        for (name, value) in self.series(meta.series).into_iter().flatten() {
            if columns.is_none_or(|cols| cols.contains(name)) {
                let column = DictColumn {
                    class: Some(FieldClass::Tag),
                    dict: vec![value.clone()],
                    codes: Codes::U8(vec![0; batch.len()]),
                };
                batch.columns.insert(name.clone(), column);
            }
        }
        Ok(batch)
    }

    /// This segment's file handle: from the cache, or opened again and cached.
    fn file(&self) -> Result<std::sync::Arc<File>, SegmentError> {
        if let Some(file) = OPEN_FILES.lock().expect("open segment files lock").files.get(&self.id) {
            return Ok(file.clone());
        }
        let io = |source| SegmentError::Io { path: self.path.display().to_string(), source };
        let file = std::sync::Arc::new(File::open(&self.path).map_err(io)?);
        keep_open(self.id, file.clone());
        Ok(file)
    }

    /// The encoded bytes of one block, checked against its checksum.
    fn read_block_bytes(&self, meta: &BlockMeta) -> Result<Vec<u8>, SegmentError> {
        let path = || self.path.display().to_string();
        let mut bytes = vec![0u8; meta.len as usize];
        self.file()?
            .read_exact_at(&mut bytes, meta.offset)
            .map_err(|source| SegmentError::Io { path: path(), source })?;
        if crc32fast::hash(&bytes) != meta.crc {
            return Err(SegmentError::Corrupt {
                path: path(),
                what: format!("block at {} fails its checksum", meta.offset),
            });
        }
        Ok(bytes)
    }

    /// Reads the whole segment back into one batch (for merges and deletes).
    pub fn read_all(&self) -> Result<RowBatch, SegmentError> {
        let mut builder = RowBatchBuilder::default();
        for meta in &self.blocks {
            builder.extend_from(&self.read_block(meta, None)?, None);
        }
        Ok(builder.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Point;

    #[test]
    fn more_segments_than_open_files_all_read_and_a_retired_file_goes_with_its_last_reader() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = RowBatchBuilder::default();
        for t in 0..10 {
            b.push(&Point {
                timestamp: t,
                value: Num::Int(t),
                dimensions: Default::default(),
                tags: Default::default(),
            })
            .unwrap();
        }
        let first = segment_path(dir.path(), 0);
        write_segment(&first, 1, &b.finish(), None).unwrap();
        let count = OPEN_SEGMENT_FILES_MAX + 100;
        let segments: Vec<std::sync::Arc<Segment>> = (1..=count as u64)
            .map(|seq| {
                let path = segment_path(dir.path(), seq);
                std::fs::copy(&first, &path).unwrap();
                std::sync::Arc::new(Segment::open(&path, seq).unwrap())
            })
            .collect();
        assert!(open_segment_files() <= OPEN_SEGMENT_FILES_MAX, "the cache of open files is bounded");
        // Every segment still reads, the evicted ones by opening their file again.
        for seg in &segments {
            assert_eq!(seg.read_all().unwrap().len(), 10, "{}", seg.path.display());
        }
        assert!(open_segment_files() <= OPEN_SEGMENT_FILES_MAX);
        // A retired segment keeps its file while a reader holds it, even with its handle evicted.
        let reader = segments[0].clone();
        segments[0].retire();
        drop(segments);
        assert_eq!(reader.read_all().unwrap().len(), 10);
        let path = reader.path.clone();
        assert!(path.exists());
        drop(reader);
        assert!(!path.exists(), "the last reader's drop removes a retired segment's file");
    }

    /// Points of 4 series (by region; every other one with a host dimension) over three
    /// hour-windows, written in descending time order.
    fn four_series(n: usize) -> RowBatch {
        let mut b = RowBatchBuilder::default();
        for i in (0..n).rev() {
            let mut p = Point {
                timestamp: (i as i64) * 1000,
                value: if i % 3 == 0 { Num::Dec(i as f64 / 2.0) } else { Num::Int(i as i64) },
                dimensions: Default::default(),
                tags: Default::default(),
            };
            p.tags.insert("region".into(), FieldValue::Str(format!("r{}", i % 4)));
            if i % 2 == 0 {
                p.dimensions.insert("host".into(), FieldValue::Int(i as i64 % 7));
            }
            b.push(&p).unwrap();
        }
        b.finish()
    }

    fn sorted_points(batch: &RowBatch) -> Vec<String> {
        let mut points: Vec<String> = (0..batch.len()).map(|r| format!("{:?}", batch.point(r))).collect();
        points.sort();
        points
    }

    #[test]
    fn blocks_hold_one_series_in_one_window_with_their_summary() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * 3600 + 500;
        let batch = four_series(n);
        let path = segment_path(dir.path(), 1);
        let written = write_segment(&path, 1, &batch, None).unwrap();
        let seg = Segment::open(&path, 1).unwrap();
        // The segment the writer hands back is the one its file opens as.
        assert_eq!(written.blocks, seg.blocks);
        assert_eq!(written.index.series, seg.index.series);
        assert_eq!(written.index.ranges, seg.index.ranges);
        assert_eq!(written.inode, seg.inode);
        assert_eq!(seg.points(), n as u64);
        assert_eq!(seg.series_count(), 4);
        // Four series over four windows (the last one partly).
        assert_eq!(seg.blocks.len(), 16);
        for meta in &seg.blocks {
            let block = seg.read_block(meta, None).unwrap();
            let series = seg.series(meta.series).unwrap();
            assert_eq!(window_of(meta.min_ts), window_of(meta.max_ts), "one window per block");
            assert!(block.timestamps.is_sorted());
            let mut summary = Summary::default();
            for r in 0..block.len() {
                assert_eq!(&series_of_row(&block, r), series, "the series' tags come back on every row");
                summary.add(block.timestamps[r], block.values.get(r));
            }
            assert_eq!(meta.summary(), Some(summary));
        }
        assert_eq!(sorted_points(&seg.read_all().unwrap()), sorted_points(&batch), "every point comes back");
        // The postings: one series per region, none for an unknown value or tag.
        let r2 = seg.series_with("region", &FieldValue::Str("r2".into())).unwrap();
        assert_eq!(r2.len(), 1);
        assert!(seg.blocks_of(Some(r2)).all(|b| b.series == r2[0]));
        assert_eq!(seg.blocks_of(Some(r2)).map(|b| b.count as usize).sum::<usize>(), n / 4);
        assert_eq!(seg.series_with("region", &FieldValue::Str("r9".into())), Some(&[][..]));
        assert!(seg.series_with("host", &FieldValue::Int(1)).is_none(), "host is a dimension, not in the index");
        // Only the columns asked for.
        let only_region = seg.read_block(&seg.blocks[0], Some(&["region".to_string()])).unwrap();
        assert!(only_region.columns.contains_key("region") && !only_region.columns.contains_key("host"));
    }

    /// The compact forms come back exactly: timestamps at a fixed stride, all-decimal values,
    /// write times as runs; irregular timestamps and integer columns with nulls keep the
    /// general forms.
    #[test]
    fn compact_columns_round_trip() {
        let points = |times: &[i64], dec: bool, at_ms: i64| {
            let mut b = RowBatchBuilder::default();
            for (i, &t) in times.iter().enumerate() {
                let mut p = Point {
                    timestamp: t,
                    value: if dec { Num::Dec(i as f64 + 0.25) } else { Num::Int(i as i64) },
                    dimensions: Default::default(),
                    tags: Default::default(),
                };
                if !dec && i % 2 == 0 {
                    p.dimensions.insert("code".into(), FieldValue::Int(200 + i as i64 % 3));
                }
                b.push(&p).unwrap();
            }
            let mut batch = b.finish();
            batch.stamp_written(at_ms);
            batch
        };
        let regular: Vec<i64> = (0..300).map(|i| i * 10_000).collect();
        let irregular: Vec<i64> = (0..300).map(|i| 2_000_000_000 + i * i).collect();
        let mut all = RowBatchBuilder::default();
        // One regular decimal series written in three goes (three runs of write times).
        for (part, at) in regular.chunks(100).zip([7_000, 9_000, 8_000]) {
            all.extend_from(&points(part, true, at), None);
        }
        all.extend_from(&points(&irregular, false, 5), None);
        let mut batch = all.finish();
        // A second series: the irregular one differs by a tag.
        batch.columns.insert(
            "s".into(),
            DictColumn {
                class: Some(FieldClass::Tag),
                dict: vec![FieldValue::Str("a".into()), FieldValue::Str("b".into())],
                codes: (0..batch.len()).map(|r| u32::from(r >= 300)).collect(),
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        write_segment(&path, 1, &batch, None).unwrap();
        let seg = Segment::open(&path, 1).unwrap();
        let back = seg.read_all().unwrap();
        assert_eq!(sorted_points(&back), sorted_points(&batch));
        let mut written: Vec<(i64, i64)> = back.timestamps.iter().copied().zip(back.written()).collect();
        let mut expected: Vec<(i64, i64)> = batch.timestamps.iter().copied().zip(batch.written()).collect();
        written.sort();
        expected.sort();
        assert_eq!(written, expected, "write times come back with their points");
        let mut forms = Vec::new();
        for meta in &seg.blocks {
            let block: EncodedBlock<Vec<u8>> = postcard::from_bytes(&seg.read_block_bytes(meta).unwrap()).unwrap();
            let runs = block.fields.iter().find(|f| f.name == crate::model::batch::WRITTEN_COLUMN).unwrap();
            let code = block.fields.iter().find(|f| f.name == "code");
            forms.push((
                block.timestamps[0] == STRIDE,
                block.value_kinds == ALL_DECIMAL,
                runs.dict.is_empty() && runs.codes[0] == INT_RUNS,
                code.is_some_and(|c| !c.dict.is_empty()),
            ));
        }
        forms.sort();
        // The irregular integer series, then the regular decimal one.
        assert_eq!(forms, [(false, false, true, true), (true, true, true, false)]);
    }

    #[test]
    fn a_corrupt_block_is_reported_and_a_first_format_segment_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let batch = four_series(1000);
        let path = segment_path(dir.path(), 1);
        write_segment(&path, 1, &batch, None).unwrap();
        // Flip one byte inside the first block: reading it must fail, not return wrong data.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let seg = Segment::open(&path, 1).unwrap();
        let first_in_file = seg.blocks.iter().min_by_key(|b| b.offset).unwrap();
        assert!(matches!(seg.read_block(first_in_file, None), Err(SegmentError::Corrupt { .. })));

        // The first format: blocks of mixed series by time (no tags kept apart), a plain
        // footer of (offset, len, crc, count, min_ts, max_ts, min_value, max_value).
        let mut file = MAGIC_V1.to_vec();
        let mut metas = Vec::new();
        let rows: Vec<usize> = (0..batch.len()).rev().collect();
        let mut v1 = batch.clone();
        for col in v1.columns.values_mut() {
            col.class = Some(FieldClass::Dimension);
        }
        for chunk in rows.chunks(600) {
            let block = postcard::to_stdvec(&encode_block(&v1, chunk)).unwrap();
            let ts = |r: usize| v1.timestamps[r];
            metas.push((
                file.len() as u64,
                block.len() as u64,
                crc32fast::hash(&block),
                chunk.len() as u32,
                ts(chunk[0]),
                ts(*chunk.last().unwrap()),
                0f64,
                0f64,
            ));
            file.extend_from_slice(&block);
        }
        let footer = postcard::to_stdvec(&metas).unwrap();
        file.extend_from_slice(&footer);
        file.extend_from_slice(&(footer.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&footer).to_le_bytes());
        file.extend_from_slice(END_MAGIC);
        let old = segment_path(dir.path(), 2);
        std::fs::write(&old, &file).unwrap();
        let seg = Segment::open(&old, 2).unwrap();
        assert!(seg.blocks.iter().all(|b| b.series == NO_SERIES && b.summary().is_none()));
        assert_eq!(seg.blocks_of(Some(&[])).count(), 2, "blocks of mixed series belong to every selection");
        assert_eq!(sorted_points(&seg.read_all().unwrap()), sorted_points(&v1));
    }

    #[test]
    fn codes_round_trip_in_every_width_and_pco_codes_still_read() {
        for (dict_len, width) in [(1usize, 1u8), (255, 1), (256, 2), (65_535, 2), (65_536, 4), (1 << 20, 4)] {
            let codes: Vec<u32> =
                (0..1000u32).map(|i| if i % 7 == 0 { NULL_CODE } else { (i * 7919) % dict_len as u32 }).collect();
            let bytes = encode_codes(&codes, dict_len);
            assert_eq!(bytes[0], width, "dictionary of {dict_len}");
            assert_eq!(decode_codes(&bytes).unwrap(), codes, "dictionary of {dict_len}");
        }
        // Segments written before hold pco chunks.
        let codes = vec![0, 3, NULL_CODE, 2];
        assert_eq!(decode_codes(&pco_compress(&codes, pco::DeltaSpec::Auto)).unwrap(), codes);
        assert!(decode_codes(&[3, 0, 0]).is_err(), "an unknown width is an error");
    }

    /// Decimals come back bit for bit whether they scale to integers or stay floats: -0.0,
    /// NaN, infinities, values with too many places or too large to scale keep their floats.
    #[test]
    fn decimals_round_trip_bit_for_bit_scaled_or_not() {
        let mut seed = 19u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 11
        };
        let readings: Vec<f64> = (0..500).map(|_| ((next() % 20_001) as i64 - 10_000) as f64 / 100.0).collect();
        let any_bits: Vec<f64> = (0..500).map(|_| f64::from_bits(next() << 11 | next() & 0x7ff)).collect();
        let cases: Vec<(Vec<f64>, Option<u8>)> = vec![
            (readings, Some(2)),
            (vec![1.0, 2.0, -3.0], Some(0)),
            (vec![0.5, 0.123456789], Some(9)),
            (vec![0.1, 0.30000000000000004], None),
            (vec![-0.0, 1.5], None),
            (vec![f64::NAN, 1.0], None),
            (vec![f64::INFINITY, 1.0], None),
            (vec![1e300], None),
            (vec![1e-10], None),
            (any_bits, None),
        ];
        for (decs, digits) in cases {
            let bytes = encode_decimals(&decs);
            let scaled = (bytes[0] == SCALED).then(|| bytes[1]);
            assert_eq!(scaled, digits, "{:?}", &decs[..decs.len().min(3)]);
            let back = decode_decimals(&bytes).unwrap();
            let bits = |v: &[f64]| v.iter().map(|d| d.to_bits()).collect::<Vec<u64>>();
            assert_eq!(bits(&back), bits(&decs));
        }
        assert!(encode_decimals(&[]).is_empty());
        assert!(decode_decimals(&[SCALED, SCALE_DIGITS_MAX + 1]).is_err(), "an unknown scale is an error");
    }

    proptest::proptest! {
        /// Any integers come back from their bytes, packed (a few) or pco (more), whatever
        /// their spread: extremes, deltas past i64, a constant, one value.
        #[test]
        fn integers_round_trip_packed_or_pco(
            ints in proptest::collection::vec(proptest::prop_oneof![
                proptest::prelude::any::<i64>(),
                -1000i64..1000,
                proptest::prelude::Just(i64::MIN),
                proptest::prelude::Just(i64::MAX),
            ], 0..(2 * PACKED_ROWS_MAX)),
        ) {
            let bytes = compress_ints(&ints);
            proptest::prop_assert_eq!(bytes.first() == Some(&PACKED), !ints.is_empty() && ints.len() <= PACKED_ROWS_MAX);
            proptest::prop_assert_eq!(decompress_ints(&bytes).unwrap(), ints.clone());
            if !ints.is_empty() && ints.len() <= PACKED_ROWS_MAX {
                // Timestamps take the same packing when they are few and not at a stride.
                proptest::prop_assert_eq!(decode_timestamps(&encode_timestamps(&ints)).unwrap(), ints);
            }
        }
    }

    use proptest::prelude::Strategy as _;

    proptest::proptest! {
        /// A block's summary held compactly comes back whole: sums past i64, -0.0, mixed kinds,
        /// ties on the first or last timestamp.
        #[test]
        fn block_summaries_held_compactly_come_back_whole(
            points in proptest::collection::vec((0i64..50, proptest::prop_oneof![
                proptest::prelude::any::<i64>().prop_map(Num::Int),
                proptest::prelude::any::<f64>().prop_filter("finite", |d| d.is_finite()).prop_map(Num::Dec),
                proptest::prelude::Just(Num::Dec(-0.0)),
            ]), 1..40),
        ) {
            let mut points = points;
            points.sort_by_key(|p| p.0);
            let mut summary = Summary::default();
            points.iter().for_each(|&(t, v)| summary.add(t, v));
            let (min_ts, max_ts) = (points[0].0, points[points.len() - 1].0);
            let meta = BlockMeta {
                offset: 8,
                len: 1,
                crc: 0,
                count: points.len() as u32,
                min_ts,
                max_ts,
                series: 0,
                summary: BlockSummary::of(&summary, points.len() as u32, min_ts, max_ts),
            };
            let back = meta.summary().unwrap();
            proptest::prop_assert_eq!(format!("{back:?}"), format!("{summary:?}"));
            // And through the footer's form.
            let stored: BlockMeta = postcard::from_bytes(&postcard::to_stdvec(&meta).unwrap()).unwrap();
            proptest::prop_assert_eq!(format!("{:?}", stored.summary()), format!("{:?}", Some(summary)));
        }
    }

    /// A writer finds a series it has by its tags however it is handed over, keeps series
    /// apart that differ only in a value's kind or sign, and survives a hash collision.
    #[test]
    fn writers_number_each_series_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(&segment_path(dir.path(), 1)).unwrap();
        let tagged = |v: FieldValue| -> Series { vec![("host".to_string(), v)] };
        let (a, b, c, d) = (
            tagged(FieldValue::Int(1)),
            tagged(FieldValue::Dec(1.0)),
            tagged(FieldValue::Dec(0.0)),
            tagged(FieldValue::Dec(-0.0)),
        );
        let ids: Vec<u32> = [&a, &b, &c, &d].iter().map(|s| w.series_id(std::borrow::Cow::Borrowed(*s))).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        assert_eq!(w.series_id(std::borrow::Cow::Owned(b.clone())), 1);
        // A series whose hash another one took first.
        let e = tagged(FieldValue::Str("e".into()));
        w.series_ids.insert(series_hash(&w.hasher, &e), 0);
        let id = w.series_id(std::borrow::Cow::Borrowed(&e));
        assert_eq!(id, 4);
        assert_eq!(w.series_id(std::borrow::Cow::Borrowed(&e)), 4);
        assert_eq!(w.series_id(std::borrow::Cow::Borrowed(&a)), 0, "the first holder of the hash is still found");
    }

    #[test]
    fn block_metadata_stays_small() {
        assert!(std::mem::size_of::<BlockMeta>() <= 120, "{} bytes", std::mem::size_of::<BlockMeta>());
        // A summary that does not describe its block is not kept (the block is read instead).
        let mut s = Summary::default();
        s.add(5, Num::Int(1));
        assert!(BlockSummary::of(&s, 2, 5, 5).is_none());
        assert!(BlockSummary::of(&s, 1, 4, 5).is_none());
        assert!(BlockSummary::of(&s, 1, 5, 5).is_some());
    }

    /// A few readings or a counter pack into fewer bytes than pco's chunk takes, and a packed
    /// list that is cut short or claims too many values is refused.
    #[test]
    fn few_integers_pack_smaller_than_pco_and_damage_is_refused() {
        let readings: Vec<i64> = (0..25).map(|i| (i * 7919 + 13) % 10_000).collect();
        let counter: Vec<i64> = (0..25).map(|i| 1_000_000_000 + i * 1_000 + (i * 31) % 7).collect();
        for ints in [&readings, &counter] {
            let packed = pack_ints(ints);
            let pco = pco_compress(ints, delta_spec_of(ints.iter().map(|&i| i as f64)));
            assert!(packed.len() < pco.len(), "{} packed bytes against {} pco", packed.len(), pco.len());
        }
        assert!(pack_ints(&counter).len() < 24, "a counter packs its deltas: {} bytes", pack_ints(&counter).len());
        let packed = pack_ints(&readings);
        assert!(decompress_ints(&packed[..packed.len() - 1]).is_err(), "a list cut short");
        let mut longer = packed.clone();
        longer.push(0);
        assert!(decompress_ints(&longer).is_err(), "a list with bytes to spare");
        assert!(decompress_ints(&[PACKED, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 8]).is_err(), "too many values");
    }

    /// A dictionary and its codes never take fewer bytes than [`DICT_AND_CODES_BYTES_MIN`],
    /// which lets a smaller integer column skip them.
    #[test]
    fn a_dictionary_and_codes_take_at_least_their_minimum() {
        let dict = zstd_compress(&postcard::to_stdvec(&vec![FieldValue::Int(0)]).unwrap());
        let codes = encode_codes(&[0], 1);
        assert!(dict.len() + codes.len() >= DICT_AND_CODES_BYTES_MIN, "{} + {}", dict.len(), codes.len());
    }

    /// An integer column without nulls takes the smallest of its forms and comes back as the
    /// same values: runs where they repeat, a list where each row has its own.
    #[test]
    fn integer_columns_round_trip_as_runs_or_lists() {
        let column = |values: &[i64]| {
            let mut dict: Vec<FieldValue> = Vec::new();
            let codes = values
                .iter()
                .map(|v| match dict.iter().position(|d| *d == FieldValue::Int(*v)) {
                    Some(c) => c as u32,
                    None => {
                        dict.push(FieldValue::Int(*v));
                        dict.len() as u32 - 1
                    }
                })
                .collect::<Vec<u32>>();
            (dict, codes)
        };
        let each_its_own: Vec<i64> = (0..400).map(|i| 1_796_530_236_000 + i * 1_000 + (i * 7919) % 300).collect();
        let runs: Vec<i64> = (0..400).map(|i| 1_796_530_236_000 + (i / 100) * 1_000).collect();
        for (values, form) in [(each_its_own, INT_LIST), (runs, INT_RUNS)] {
            let (dict, codes) = column(&values);
            let as_runs = encode_int_runs(&dict, &codes).unwrap();
            let as_pco = encode_int_list(&dict, &codes).unwrap();
            let smaller = if as_pco.len() < as_runs.len() { as_pco } else { as_runs };
            assert_eq!(smaller[0], form);
            let (dict2, codes2) = decode_int_column(&smaller).unwrap();
            let back: Vec<&FieldValue> = codes2.iter().map(|&c| &dict2[c as usize]).collect();
            assert_eq!(
                back,
                values
                    .iter()
                    .map(|v| &dict[dict.iter().position(|d| *d == FieldValue::Int(*v)).unwrap()])
                    .collect::<Vec<_>>()
            );
        }
        assert!(decode_int_column(b"Xjunk").is_err());
    }

    /// A segment opened alongside another shares the series they have in common (the same
    /// allocation), keeps its own for the rest, and finds every series by tag value.
    #[test]
    fn segments_share_common_series_and_find_them_by_tag_value() {
        let dir = tempfile::tempdir().unwrap();
        let write = |seq: u64, hosts: std::ops::Range<i64>| {
            let mut b = RowBatchBuilder::default();
            for h in hosts {
                let tags = [
                    ("host".to_string(), FieldValue::Str(format!("h{h:03}"))),
                    ("dc".to_string(), FieldValue::Int(h % 3)),
                ];
                b.push(&Point {
                    timestamp: h,
                    value: Num::Int(h),
                    dimensions: Default::default(),
                    tags: tags.into_iter().collect(),
                })
                .unwrap();
            }
            let path = segment_path(dir.path(), seq);
            write_segment(&path, seq, &b.finish(), None).unwrap();
            path
        };
        let first = Segment::open(&write(1, 0..100), 1).unwrap();
        let second = Segment::open_sharing(&write(2, 50..150), 2, Some(&first)).unwrap();
        let shared = (0..second.series_count() as u32)
            .filter(|&id| {
                let s = second.series(id).unwrap();
                (0..first.series_count() as u32).any(|f| std::ptr::eq(first.series(f).unwrap(), s))
            })
            .count();
        assert_eq!(shared, 50, "hosts 50..100 are in both");
        for h in 50..150 {
            let ids = second.series_with("host", &FieldValue::Str(format!("h{h:03}"))).unwrap();
            assert_eq!(ids.len(), 1);
            assert_eq!(tag_value(second.series(ids[0]).unwrap(), "host"), Some(&FieldValue::Str(format!("h{h:03}"))));
        }
        let dc1 = second.series_with("dc", &FieldValue::Int(1)).unwrap();
        assert_eq!(dc1.len(), (50..150).filter(|h| h % 3 == 1).count());
        assert!(dc1.is_sorted(), "ascending ids");
        assert!(second.series_with("host", &FieldValue::Str("h999".into())).unwrap().is_empty());
        assert!(second.series_with("rack", &FieldValue::Int(1)).is_none());
        assert!(!std::sync::Arc::ptr_eq(&first.index.postings, &second.index.postings));
        // A segment of the very same series takes the postings of the one it shares them with.
        let third = Segment::open_sharing(&write(3, 50..150), 3, Some(&second)).unwrap();
        assert!(std::sync::Arc::ptr_eq(&second.index.postings, &third.index.postings));
        assert_eq!(third.series_with("dc", &FieldValue::Int(1)).unwrap(), dc1);
    }
}
