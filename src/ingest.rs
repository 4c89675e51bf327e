//! Turns request bodies into columnar batches: NSDb JSON (`POST /data`) and Influx line
//! protocol (`POST /write`). Parsing is all-or-nothing: the first bad bit or line fails the
//! whole batch with its index or line number, so a client never has to guess what was stored.
//! Lines are parsed into borrowed slices and appended straight to columns; no point object is
//! built per line.

use crate::model::batch::{
    Codes, DictColumn, FieldEntry, FieldRef, NULL_CODE, RowBatch, RowBatchBuilder, Values, check_field,
};
use crate::model::{FieldClass, FieldValue, MetricKey, Num};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

/// Points grouped by metric, each metric's points as one columnar batch.
#[derive(Debug, Default)]
pub struct Batch {
    pub metrics: Vec<(MetricKey, RowBatch)>,
    /// Line protocol string fields, which Shoal does not store: how many were skipped, and
    /// where the first was (`line N: field "f"`), for a strict write to refuse.
    pub skipped_fields: usize,
    pub first_skipped: Option<String>,
    /// The Influx measurement and field each metric of another field than `value` came from
    /// (metric `<measurement>_<field>`), for the catalog to remember ([`crate::catalog`]).
    pub origins: BTreeMap<MetricKey, (String, String)>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.metrics.iter().map(|(_, b)| b.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Invalid(String),
    #[error("the batch has more than {max} points")]
    TooMany { max: usize },
}

fn invalid(msg: impl Into<String>) -> IngestError {
    IngestError::Invalid(msg.into())
}

/// Parses an NSDb body: `{"db","namespace","metric","bit":{...}}` or with `"bits":[...]`.
pub fn parse_nsdb_json(body: &[u8], now_ms: i64, points_max: usize) -> Result<Batch, IngestError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("body is not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| invalid("body must be a JSON object"))?;
    let text = |k: &str| -> Result<&str, IngestError> {
        obj.get(k).and_then(|v| v.as_str()).ok_or_else(|| invalid(format!("field {k:?} is missing or not a string")))
    };
    let key = MetricKey::new(text("db")?, text("namespace")?, text("metric")?).map_err(invalid)?;
    let bits: Vec<(String, &serde_json::Value)> = match (obj.get("bit"), obj.get("bits")) {
        (Some(bit), None) => vec![("bit".into(), bit)],
        (None, Some(serde_json::Value::Array(bits))) => {
            if bits.len() > points_max {
                return Err(IngestError::TooMany { max: points_max });
            }
            bits.iter().enumerate().map(|(i, b)| (format!("bits[{i}]"), b)).collect()
        }
        (None, Some(_)) => return Err(invalid("field \"bits\" must be an array")),
        (Some(_), Some(_)) => return Err(invalid("give either \"bit\" or \"bits\", not both")),
        (None, None) => return Err(invalid("field \"bit\" or \"bits\" is missing")),
    };
    let mut builder = RowBatchBuilder::default();
    for (at, bit) in bits {
        push_bit(&mut builder, bit, now_ms).map_err(|e| invalid(format!("{at}: {e}")))?;
    }
    Ok(Batch { metrics: vec![(key, builder.finish())], ..Default::default() })
}

fn push_bit(builder: &mut RowBatchBuilder, bit: &serde_json::Value, now_ms: i64) -> Result<(), String> {
    let obj = bit.as_object().ok_or("must be an object")?;
    if let Some(k) = obj.keys().find(|k| !["timestamp", "value", "dimensions", "tags"].contains(&k.as_str())) {
        return Err(format!("unknown field {k:?} (expected timestamp, value, dimensions, tags)"));
    }
    let timestamp = match obj.get("timestamp") {
        None | Some(serde_json::Value::Null) => now_ms,
        Some(t) => t.as_i64().ok_or("timestamp must be an integer number of epoch milliseconds")?,
    };
    let value = match obj.get("value") {
        Some(serde_json::Value::Number(n)) => json_num(n).ok_or("value is out of range")?,
        _ => return Err("value is missing or not a number".into()),
    };
    let mut fields: Vec<(&str, FieldClass, FieldValue)> = Vec::new();
    for (name, class) in [("dimensions", FieldClass::Dimension), ("tags", FieldClass::Tag)] {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(map)) => {
                for (k, v) in map {
                    let fv = match v {
                        serde_json::Value::String(s) => FieldValue::Str(s.clone()),
                        serde_json::Value::Number(n) => {
                            json_num(n).ok_or_else(|| format!("{name}.{k} is out of range"))?.into()
                        }
                        _ => return Err(format!("{name}.{k} must be a string or a number")),
                    };
                    fields.push((k, class, fv));
                }
            }
            Some(_) => return Err(format!("{name} must be an object")),
        }
    }
    let refs: Vec<FieldEntry> = fields.iter().map(|(n, c, v)| (*n, *c, v.into())).collect();
    builder.push_row(timestamp, value, &refs)
}

fn json_num(n: &serde_json::Number) -> Option<Num> {
    if let Some(i) = n.as_i64() {
        Some(Num::Int(i))
    } else if n.is_u64() {
        None
    } else {
        n.as_f64().filter(|f| f.is_finite()).map(Num::Dec)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Precision {
    Ns,
    Us,
    Ms,
    S,
    Minutes,
    Hours,
}

impl Precision {
    /// InfluxDB's names: `n`/`ns`, `u`/`us`, `ms`, `s`, `m` (minutes), `h`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ns" | "n" => Some(Self::Ns),
            "us" | "u" | "µ" => Some(Self::Us),
            "ms" => Some(Self::Ms),
            "s" => Some(Self::S),
            "m" => Some(Self::Minutes),
            "h" => Some(Self::Hours),
            _ => None,
        }
    }
    fn to_ms(self, t: i64) -> Option<i64> {
        match self {
            Self::Ns => Some(t.div_euclid(1_000_000)),
            Self::Us => Some(t.div_euclid(1_000)),
            Self::Ms => Some(t),
            Self::S => t.checked_mul(1000),
            Self::Minutes => t.checked_mul(60_000),
            Self::Hours => t.checked_mul(3_600_000),
        }
    }
}

/// Parses Influx line protocol. The field `value` becomes the point's value; any other field
/// `f` becomes a point of metric `<measurement>_<f>`, so every field is one NSDb metric.
/// Booleans are stored as 1 and 0; string fields are skipped and counted in the batch
/// ([`Batch::skipped_fields`]), as a time-series store of numbers must.
///
/// Lines of one series repeat the same measurement and tags, so a series' tags are parsed,
/// checked and dictionary-coded once per body: a repeated series costs one hash lookup of its
/// text, and a line's tags are shared by all the metrics its fields become.
pub fn parse_line_protocol(
    body: &str,
    db: &str,
    namespace: &str,
    precision: Precision,
    now_ms: i64,
    points_max: usize,
) -> Result<Batch, IngestError> {
    crate::model::validate_name("db", db).map_err(invalid)?;
    crate::model::validate_name("namespace", namespace).map_err(invalid)?;
    let mut measurements: Vec<Measurement> = Vec::new();
    // The series text of a line (measurement and tags, as written) → (measurement, series).
    let mut known: FastMap<&str, (usize, u32)> = FastMap::with_capacity_and_hasher(1024, Default::default());
    let mut points = 0usize;
    let (mut skipped_fields, mut first_skipped) = (0usize, None);
    let mut fields: Vec<(Cow<str>, Option<Num>)> = Vec::new();
    let mut tags: Tags = Vec::new();
    // Rows of a field metric: one per line, the usual case, so the body's first field metric
    // is allocated once for all its lines; any later one for a bounded guess.
    let line_count = memchr::memchr_iter(b'\n', body.as_bytes()).count() + 1;
    let mut rows_expected = line_count.min(points_max.saturating_add(1));
    for (idx, line) in lines(body).enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |e: String| invalid(format!("line {}: {e}", idx + 1));
        let (series_text, rest) = split_unescaped(line, b' ', false);
        let rest =
            rest.ok_or_else(|| at("missing fields (expected `measurement[,tag=v] field=v [timestamp]`)".into()))?;
        let (m, series) = match known.get(series_text) {
            Some(&found) => found,
            None => {
                let name = parse_series(series_text, &mut tags).map_err(at)?;
                let m = match measurements.iter().position(|m| m.name == name) {
                    Some(m) => m,
                    None => {
                        let new = Measurement { name, fields: Vec::new(), tags: Vec::new(), series: Vec::new() };
                        measurements.push(new);
                        measurements.len() - 1
                    }
                };
                let measurement = &mut measurements[m];
                let series = measurement.series.len() as u32;
                let from = measurement.tags.len() as u32;
                measurement.tags.append(&mut tags);
                measurement.series.push(from..measurement.tags.len() as u32);
                known.insert(series_text, (m, series));
                (m, series)
            }
        };
        let ts_text = parse_fields_and_time(rest.trim_start(), &mut fields).map_err(at)?;
        let timestamp = match ts_text.map(str::trim) {
            None | Some("") => now_ms,
            Some(t) => {
                let t = parse_i64(t).ok_or_else(|| at(format!("timestamp {t:?} is not an integer")))?;
                let ms = precision.to_ms(t).ok_or_else(|| at(format!("timestamp {t} is out of range")))?;
                crate::model::check_timestamp(ms).map_err(at)?;
                ms
            }
        };
        let measurement = &mut measurements[m];
        for (field, value) in fields.drain(..) {
            let Some(value) = value else {
                skipped_fields += 1;
                first_skipped.get_or_insert_with(|| format!("line {}: field {field:?}", idx + 1));
                continue;
            };
            let f = match measurement.fields.iter().position(|f| f.field == field) {
                Some(f) => f,
                None => {
                    let metric = if field == "value" {
                        measurement.name.to_string()
                    } else {
                        format!("{}_{field}", measurement.name)
                    };
                    let key = MetricKey::new(db, namespace, &metric).map_err(at)?;
                    measurement.fields.push(FieldRows {
                        field: field.into_owned(),
                        key,
                        timestamps: Vec::with_capacity(rows_expected),
                        values: Values::with_capacity(rows_expected),
                        series: Vec::with_capacity(rows_expected),
                    });
                    rows_expected = rows_expected.min(ROWS_RESERVED_MAX);
                    measurement.fields.len() - 1
                }
            };
            let rows = &mut measurement.fields[f];
            rows.timestamps.push(timestamp);
            rows.values.push(value);
            rows.series.push(series);
            points += 1;
            if points > points_max {
                return Err(IngestError::TooMany { max: points_max });
            }
        }
    }
    let origins = measurements
        .iter()
        .flat_map(|m| {
            m.fields
                .iter()
                .filter(|f| f.field != "value")
                .map(|f| (f.key.clone(), (m.name.to_string(), f.field.clone())))
        })
        .collect();
    Ok(Batch {
        metrics: measurements.into_iter().flat_map(Measurement::finish).collect(),
        skipped_fields,
        first_skipped,
        origins,
    })
}

/// Most rows a field metric after the body's first reserves up front: a body of many
/// measurements must not reserve its line count for each of them.
const ROWS_RESERVED_MAX: usize = 16 * 1024;

/// `str::lines` (a line ends at `\n` or `\r\n`), with the newlines found by `memchr`'s
/// vectorized search: `str::lines` was a tenth of the parsing time.
fn lines(body: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let last = (!body.is_empty() && !body.ends_with('\n')).then_some(body.len());
    memchr::memchr_iter(b'\n', body.as_bytes()).chain(last).map(move |end| {
        let line = &body[start..end];
        start = end + 1;
        match body.as_bytes().get(end) {
            Some(b'\n') => line.strip_suffix('\r').unwrap_or(line),
            _ => line,
        }
    })
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Tags<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// The lines of one measurement in a body: its series (distinct tag sets) and, per field, the
/// rows of the metric the field becomes.
struct Measurement<'a> {
    name: Cow<'a, str>,
    fields: Vec<FieldRows>,
    /// The tags of every series, one after the other (one allocation, not one per series).
    tags: Tags<'a>,
    /// Per series, its tags in `tags`.
    series: Vec<std::ops::Range<u32>>,
}

struct FieldRows {
    field: String,
    key: MetricKey,
    timestamps: Vec<i64>,
    values: Values,
    /// Per row, its series (an index into `Measurement::series`).
    series: Vec<u32>,
}

impl Measurement<'_> {
    /// One columnar batch per field metric. Tag values are coded once per series; each metric
    /// keeps in its dictionaries only the values its rows use.
    fn finish(self) -> Vec<(MetricKey, RowBatch)> {
        let n = self.series.len();
        // Per tag name: its distinct values and each series' code (NULL_CODE: no such tag).
        let mut columns: BTreeMap<&str, (Vec<&str>, Vec<u32>)> = BTreeMap::new();
        let mut codes: FastMap<(&str, &str), u32> =
            FastMap::with_capacity_and_hasher(self.tags.len(), Default::default());
        for (s, range) in self.series.iter().enumerate() {
            for (k, v) in &self.tags[range.start as usize..range.end as usize] {
                let (dict, of_series) = columns.entry(k.as_ref()).or_insert_with(|| (Vec::new(), vec![NULL_CODE; n]));
                of_series[s] = *codes.entry((k.as_ref(), v.as_ref())).or_insert_with(|| {
                    dict.push(v.as_ref());
                    dict.len() as u32 - 1
                });
            }
        }
        let mut out = Vec::with_capacity(self.fields.len());
        for rows in self.fields {
            let mut batch = RowBatch { timestamps: rows.timestamps, values: rows.values, columns: BTreeMap::new() };
            for (name, (dict, of_series)) in &columns {
                let mut remap = vec![NULL_CODE; dict.len()];
                let mut col = DictColumn {
                    class: Some(FieldClass::Tag),
                    dict: Vec::new(),
                    codes: Codes::with_capacity(rows.series.len()),
                };
                for &s in &rows.series {
                    let code = of_series[s as usize];
                    if code != NULL_CODE && remap[code as usize] == NULL_CODE {
                        remap[code as usize] = col.dict.len() as u32;
                        col.dict.push(FieldValue::Str(dict[code as usize].to_string()));
                    }
                    col.codes.push(if code == NULL_CODE { NULL_CODE } else { remap[code as usize] });
                }
                if !col.dict.is_empty() {
                    batch.columns.insert(name.to_string(), col);
                }
            }
            out.push((rows.key, batch));
        }
        out
    }
}

/// Parses a line's series text, `measurement[,tag=value]*`, checking what a client could get
/// wrong in it: returns the measurement, and the tags in `tags` (cleared first).
fn parse_series<'a>(text: &'a str, tags: &mut Tags<'a>) -> Result<Cow<'a, str>, String> {
    tags.clear();
    let (measurement, mut rest) = split_unescaped(text, b',', false);
    let measurement = unescape(measurement);
    crate::model::validate_name("measurement", &measurement)?;
    while let Some(s) = rest {
        let (tag, tail) = split_unescaped(s, b',', false);
        let (k, v) = split_unescaped(tag, b'=', false);
        let v = v.ok_or_else(|| format!("tag {tag:?} has no '='"))?;
        let (k, v) = (unescape(k), unescape(v));
        if v.is_empty() {
            return Err(format!("tag {k:?} has an empty value"));
        }
        check_field(&k, FieldClass::Tag, FieldRef::Str(&v))?;
        if tags.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("field {k:?} appears twice in one point"));
        }
        tags.push((k, v));
        rest = tail;
    }
    Ok(measurement)
}

/// Parses `field=value[,field=value]*[ timestamp]` into `out` (cleared first) and returns the
/// timestamp's text. Fields without escapes or quotes, nearly all, are read in one pass;
/// the first `\\` or `"` hands the whole text to the general path.
fn parse_fields_and_time<'a>(
    text: &'a str,
    out: &mut Vec<(Cow<'a, str>, Option<Num>)>,
) -> Result<Option<&'a str>, String> {
    out.clear();
    let b = text.as_bytes();
    let (mut start, mut i) = (0, 0);
    loop {
        while i < b.len() && !matches!(b[i], b'=' | b',' | b' ' | b'\\' | b'"') {
            i += 1;
        }
        if i == b.len() || b[i] != b'=' {
            break;
        }
        let key = &text[start..i];
        i += 1;
        let value_start = i;
        while i < b.len() && !matches!(b[i], b',' | b' ' | b'\\' | b'"') {
            i += 1;
        }
        if i < b.len() && matches!(b[i], b'\\' | b'"') {
            break;
        }
        out.push((Cow::Borrowed(key), parse_field_value(key, &text[value_start..i])?));
        match b.get(i) {
            None => return Ok(None),
            Some(b' ') => return Ok(Some(&text[i + 1..])),
            _ => {
                i += 1;
                start = i;
            }
        }
    }
    let (fields_text, ts_text) = split_unescaped(text, b' ', true);
    parse_fields(fields_text, out)?;
    Ok(ts_text)
}

/// Parses `field=value[,field=value]*` into `out` (cleared first).
fn parse_fields<'a>(text: &'a str, out: &mut Vec<(Cow<'a, str>, Option<Num>)>) -> Result<(), String> {
    out.clear();
    let mut s = text;
    loop {
        let (field, tail) = split_unescaped(s, b',', true);
        let (k, v) = split_unescaped(field, b'=', true);
        let v = v.ok_or_else(|| format!("field {field:?} has no '='"))?;
        let k = unescape(k);
        let value = parse_field_value(&k, v)?;
        out.push((k, value));
        match tail {
            Some(t) => s = t,
            None => return Ok(()),
        }
    }
}

/// Splits `s` at the first unescaped (and, with `track_quotes`, unquoted) `sep`. Returns
/// (before, after).
fn split_unescaped(s: &str, sep: u8, track_quotes: bool) -> (&str, Option<&str>) {
    let bytes = s.as_bytes();
    let (mut i, mut in_quotes) = (0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'"' if track_quotes => in_quotes = !in_quotes,
            // `sep` is ASCII, so both sides are on character boundaries.
            b if b == sep && !in_quotes => return (&s[..i], Some(&s[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    (s, None)
}

/// Removes line-protocol escapes; borrows when there is nothing to remove (the usual case).
fn unescape(s: &str) -> Cow<'_, str> {
    // A byte loop: the strings are short, and most have nothing to remove.
    if !s.as_bytes().contains(&b'\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ (',' | '=' | ' ' | '"' | '\\')) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `str::parse::<i64>`, with a fast path for up to 19 digits (a nanosecond timestamp): they
/// fit a u64 whatever they are, so the digits are summed without a check per digit.
fn parse_i64(s: &str) -> Option<i64> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest.as_bytes()),
        None => (false, s.as_bytes()),
    };
    if digits.is_empty() || digits.len() > 19 {
        return s.parse().ok();
    }
    // The leading digits one by one, then eight at a time.
    let (head, tail) = digits.split_at(digits.len() % 8);
    if !head.iter().all(u8::is_ascii_digit) {
        return s.parse().ok();
    }
    let mut n = head.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    for chunk in tail.chunks_exact(8) {
        match eight_digits(chunk.try_into().expect("chunks of 8")) {
            Some(v) => n = n * 100_000_000 + v,
            None => return s.parse().ok(),
        }
    }
    if negative { 0i64.checked_sub_unsigned(n) } else { i64::try_from(n).ok() }
}

/// `str::parse::<f64>`, with a fast path for plain decimals of up to 15 digits (`12.5`,
/// `-0.25`): the digits are an integer below 2^53 and the divisor a power of ten below 10^16,
/// both exact in an f64, so one division is correctly rounded (Clinger's fast path) and gives
/// the very bits `str::parse` gives. Exponents, signs other than `-` and longer numbers take
/// the general path.
fn parse_f64(s: &str) -> Option<f64> {
    const POW10: [f64; 16] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15];
    let (negative, bytes) = match s.strip_prefix('-') {
        Some(rest) => (true, rest.as_bytes()),
        None => (false, s.as_bytes()),
    };
    let (mut mantissa, mut digits, mut dot) = (0u64, 0usize, None);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'0'..=b'9' if digits < POW10.len() - 1 => {
                mantissa = mantissa * 10 + u64::from(b - b'0');
                digits += 1;
            }
            b'.' if dot.is_none() => dot = Some(i),
            _ => return s.parse().ok(),
        }
    }
    if digits == 0 {
        return s.parse().ok();
    }
    let fraction_digits = dot.map_or(0, |at| bytes.len() - at - 1);
    let v = mantissa as f64 / POW10[fraction_digits];
    Some(if negative { -v } else { v })
}

/// The value of eight ASCII digits, `None` if any byte is not one, in a few word operations
/// (the SWAR method of simdjson's `parse_eight_digits_unrolled`).
fn eight_digits(bytes: [u8; 8]) -> Option<u64> {
    let v = u64::from_le_bytes(bytes);
    let all_digits =
        (v & 0xF0F0_F0F0_F0F0_F0F0) | ((v.wrapping_add(0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0) >> 4);
    if all_digits != 0x3333_3333_3333_3333 {
        return None;
    }
    let v = v - 0x3030_3030_3030_3030;
    let v = v.wrapping_mul(10).wrapping_add(v >> 8);
    let (mask, mul1, mul2) = (0x0000_00FF_0000_00FFu64, 100 + (1_000_000u64 << 32), 1 + (10_000u64 << 32));
    Some(((v & mask).wrapping_mul(mul1).wrapping_add(((v >> 16) & mask).wrapping_mul(mul2))) >> 32)
}

/// A field's value: a number, a boolean as 1 or 0, or `None` for a string (skipped).
fn parse_field_value(name: &str, v: &str) -> Result<Option<Num>, String> {
    if v.starts_with('"') {
        if v.len() < 2 || !v.ends_with('"') {
            return Err(format!("field {name:?}: the string {v:?} is not closed"));
        }
        return Ok(None);
    }
    match v {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(Some(Num::Int(1))),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(Some(Num::Int(0))),
        _ => {}
    }
    parse_number(name, v).map(Some)
}

fn parse_number(name: &str, v: &str) -> Result<Num, String> {
    // A decimal, the usual case, ends in a digit or a dot; anything else is checked below.
    if v.ends_with(|c: char| c.is_ascii_digit() || c == '.') {
        return match parse_f64(v) {
            Some(f) if f.is_finite() => Ok(Num::Dec(f)),
            _ => Err(format!("field {name:?}: {v:?} is not a number")),
        };
    }
    if let Some(int) = v.strip_suffix('i') {
        return parse_i64(int).map(Num::Int).ok_or_else(|| format!("field {name:?}: {v:?} is not an integer"));
    }
    if let Some(uint) = v.strip_suffix('u') {
        return uint
            .parse::<u64>()
            .ok()
            .and_then(|u| i64::try_from(u).ok())
            .map(Num::Int)
            .ok_or_else(|| format!("field {name:?}: {v:?} is not an unsigned integer below 2^63"));
    }
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Num::Dec(f)),
        _ => Err(format!("field {name:?}: {v:?} is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsdb_single_and_batch() {
        let b = parse_nsdb_json(
            br#"{"db":"d","namespace":"n","metric":"m","bit":{"timestamp":5,"value":1.5,"dimensions":{"x":1},"tags":{"r":"eu"}}}"#,
            0,
            10,
        )
        .unwrap();
        let (_, points) = &b.metrics[0];
        assert_eq!(points.point(0).value, Num::Dec(1.5));
        assert_eq!(points.point(0).dimensions["x"], FieldValue::Int(1));
        let b = parse_nsdb_json(
            br#"{"db":"d","namespace":"n","metric":"m","bits":[{"timestamp":1,"value":1},{"value":2}]}"#,
            77,
            10,
        )
        .unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.metrics[0].1.timestamps[1], 77);
        let err =
            parse_nsdb_json(br#"{"db":"d","namespace":"n","metric":"m","bits":[{"value":1},{"value":"x"}]}"#, 0, 10)
                .unwrap_err()
                .to_string();
        assert!(err.contains("bits[1]"), "{err}");
        assert!(matches!(
            parse_nsdb_json(br#"{"db":"d","namespace":"n","metric":"m","bits":[{"value":1},{"value":2}]}"#, 0, 1),
            Err(IngestError::TooMany { .. })
        ));
    }

    #[test]
    fn line_protocol_fields_tags_escapes() {
        let body = "cpu,host=a\\ b,region=eu value=1i,usage=0.5 1000000000\n# comment\nmem value=2 3000000";
        let b = parse_line_protocol(body, "d", "n", Precision::Ns, 0, 100).unwrap();
        assert_eq!(b.metrics.len(), 3);
        let (k, p) = &b.metrics[0];
        assert_eq!(k.metric, "cpu");
        let p = p.point(0);
        assert_eq!(p.value, Num::Int(1));
        assert_eq!(p.timestamp, 1000);
        assert_eq!(p.tags["host"], FieldValue::Str("a b".into()));
        assert_eq!(b.metrics[1].0.metric, "cpu_usage");
        assert_eq!(b.metrics[2].1.timestamps[0], 3);
        let b = parse_line_protocol("m value=1 5", "d", "n", Precision::S, 0, 100).unwrap();
        assert_eq!(b.metrics[0].1.timestamps[0], 5000);
    }

    #[test]
    fn parse_i64_agrees_with_std() {
        for s in ["0", "-0", "7", "-7", "1700000000000000000", "9223372036854775807", "-9223372036854775808"] {
            assert_eq!(parse_i64(s), s.parse().ok(), "{s}");
        }
        for s in ["", "-", "9223372036854775808", "-9223372036854775809", "99999999999999999999", "1x", "+5", " 1"] {
            assert_eq!(parse_i64(s), s.parse().ok(), "{s}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_f64_agrees_with_std(s in "-?[0-9]{0,18}(\\.[0-9]{0,18})?|[-+.e0-9]{1,12}") {
            let ours = parse_f64(&s).map(f64::to_bits);
            proptest::prop_assert_eq!(ours, s.parse::<f64>().ok().map(f64::to_bits), "{:?}", s);
        }
    }

    proptest::proptest! {
        #[test]
        fn one_pass_fields_agree_with_the_general_path(text in "[ab0-9=,. \"\\\\i-]{0,16}") {
            let mut fast = Vec::new();
            let fast = parse_fields_and_time(&text, &mut fast).map(|ts| (fast, ts));
            let (fields_text, ts) = split_unescaped(&text, b' ', true);
            let mut general = Vec::new();
            let general = parse_fields(fields_text, &mut general).map(|()| (general, ts));
            proptest::prop_assert_eq!(format!("{fast:?}"), format!("{general:?}"));
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_i64_agrees_with_std_on_any_digits(s in "-?[0-9]{1,20}|[0-9:/ a-]{1,20}") {
            proptest::prop_assert_eq!(parse_i64(&s), s.parse::<i64>().ok(), "{:?}", s);
        }
    }

    #[test]
    fn lines_agree_with_std() {
        for body in ["", "\n", "a", "a\n", "a\nb", "a\r\nb\r\n", "\n\na\n\n", "a\r", "\r\n"] {
            assert_eq!(lines(body).collect::<Vec<_>>(), body.lines().collect::<Vec<_>>(), "{body:?}");
        }
    }

    #[test]
    fn parse_f64_agrees_with_std_at_the_edges() {
        for s in [
            "0",
            "-0",
            "-0.0",
            ".5",
            "5.",
            ".",
            "-",
            "",
            "999999999999999",
            "9999999999999999",
            "0.1",
            "-12.75",
            "1.000000000000001",
            "0.000000000000001",
            "1e3",
            "+2",
            "1..2",
            "inf",
        ] {
            assert_eq!(parse_f64(s).map(f64::to_bits), s.parse::<f64>().ok().map(f64::to_bits), "{s:?}");
        }
    }

    /// Booleans are stored as 1 and 0; strings are skipped and counted, with where the first was.
    #[test]
    fn booleans_become_numbers_and_strings_are_skipped() {
        let body = "m,h=a value=true,on=F,note=\"a b, c\",n=2i 1000\nm,h=a value=f,label=\"x\" 2000";
        let b = parse_line_protocol(body, "d", "n", Precision::Ms, 0, 100).unwrap();
        let values = |metric: &str| -> Vec<Num> {
            b.metrics
                .iter()
                .find(|(k, _)| k.metric == metric)
                .map(|(_, r)| r.values.iter().collect())
                .unwrap_or_default()
        };
        assert_eq!(values("m"), [Num::Int(1), Num::Int(0)]);
        assert_eq!(values("m_on"), [Num::Int(0)]);
        assert_eq!(values("m_n"), [Num::Int(2)]);
        assert!(values("m_note").is_empty() && values("m_label").is_empty());
        assert_eq!(b.skipped_fields, 2);
        assert_eq!(b.first_skipped.as_deref(), Some("line 1: field \"note\""));
        assert_eq!(Precision::parse("m").and_then(|p| p.to_ms(2)), Some(120_000));
        assert_eq!(Precision::parse("h").and_then(|p| p.to_ms(1)), Some(3_600_000));
    }

    #[test]
    fn line_protocol_errors_name_the_line() {
        for (body, needle) in [
            ("m value=1\nm value=abc", "line 2"),
            ("m", "line 1: missing fields"),
            ("m value=\"s", "not closed"),
            ("m,t value=1", "no '='"),
            ("m value=1 12x", "timestamp"),
            ("9m value=1", "measurement"),
        ] {
            let err = parse_line_protocol(body, "d", "n", Precision::Ns, 0, 100).unwrap_err().to_string();
            assert!(err.contains(needle), "{body:?}: {err}");
        }
    }
}
