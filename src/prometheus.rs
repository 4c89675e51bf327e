//! Prometheus remote_write 1.0 (`POST /api/v1/write`): a snappy-compressed protobuf
//! `WriteRequest`. `__name__` is the metric, the other labels are tags, each sample a point.
//! Stale markers (the NaN Prometheus writes when a series disappears) are skipped, as are
//! other non-finite values and series whose name or labels are not valid Shoal names; both are
//! counted so the caller can say so.

use crate::ingest::Batch;
use crate::model::batch::RowBatchBuilder;
use crate::model::{FieldValue, MetricKey, Num, Point};
use std::collections::BTreeMap;

/// The protobuf messages of remote_write 1.0 (prometheus/prompb/types.proto, remote.proto),
/// the fields Shoal reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The bits of Prometheus' staleness marker.
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

/// What a remote_write body held besides the points stored.
#[derive(Debug, Default, PartialEq)]
pub struct Skipped {
    /// Stale markers and other NaN or infinite samples.
    pub samples: usize,
    /// Series whose metric or label names Shoal cannot take, with the first one's reason.
    pub series: usize,
    pub first_series: Option<String>,
}

/// Decodes a remote_write body into points of `db`/`namespace`, at most `points_max`.
pub fn parse_remote_write(
    body: &[u8],
    db: &str,
    namespace: &str,
    points_max: usize,
) -> Result<(Batch, Skipped), String> {
    // The decompressed size is in the block's header: refuse a body that claims too much
    // before allocating it.
    let claimed = snap::raw::decompress_len(body).map_err(|e| format!("the body is not snappy-compressed: {e}"))?;
    let limit = points_max.saturating_mul(256).max(1 << 20);
    if claimed > limit {
        return Err(format!("the body decompresses to {claimed} bytes; at most {limit} are accepted"));
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("the body is not snappy-compressed: {e}"))?;
    let request: WriteRequest =
        prost::Message::decode(&raw[..]).map_err(|e| format!("the body is not a remote_write WriteRequest: {e}"))?;
    crate::model::validate_name("db", db)?;
    crate::model::validate_name("namespace", namespace)?;
    let mut skipped = Skipped::default();
    let mut builders: BTreeMap<MetricKey, RowBatchBuilder> = BTreeMap::new();
    let mut points = 0usize;
    for series in request.timeseries {
        let mut name = None;
        let mut tags = BTreeMap::new();
        let mut bad = None;
        for label in series.labels {
            if label.name == "__name__" {
                name = Some(label.value);
            } else if let Err(e) = crate::model::validate_name("label", &label.name) {
                bad.get_or_insert(e);
            } else if !label.value.is_empty() {
                tags.insert(label.name, FieldValue::Str(label.value));
            }
        }
        let key = match name {
            None => Err("a series has no __name__ label".to_string()),
            Some(n) => MetricKey::new(db, namespace, &n),
        };
        let key = match (key, bad) {
            (Ok(key), None) => key,
            (Err(e), _) | (_, Some(e)) => {
                skipped.series += 1;
                skipped.first_series.get_or_insert(e);
                continue;
            }
        };
        let builder = builders.entry(key).or_default();
        for sample in series.samples {
            if !sample.value.is_finite() || sample.value.to_bits() == STALE_NAN {
                skipped.samples += 1;
                continue;
            }
            crate::model::check_timestamp(sample.timestamp)?;
            let point = Point {
                timestamp: sample.timestamp,
                value: Num::Dec(sample.value),
                dimensions: BTreeMap::new(),
                tags: tags.clone(),
            };
            builder.push(&point)?;
            points += 1;
            if points > points_max {
                return Err(format!("the body has more than {points_max} samples (shoal.write.max-batch-points)"));
            }
        }
    }
    let metrics = builders.into_iter().map(|(k, b)| (k, b.finish())).filter(|(_, b)| !b.is_empty()).collect();
    Ok((Batch { metrics, ..Default::default() }, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(series: Vec<TimeSeries>) -> Vec<u8> {
        let raw = prost::Message::encode_to_vec(&WriteRequest { timeseries: series });
        snap::raw::Encoder::new().compress_vec(&raw).unwrap()
    }

    fn label(name: &str, value: &str) -> Label {
        Label { name: name.into(), value: value.into() }
    }

    #[test]
    fn series_become_points_and_stale_markers_are_skipped() {
        let ok = TimeSeries {
            labels: vec![label("__name__", "up"), label("job", "shoal"), label("instance", "n1:9000")],
            samples: vec![
                Sample { value: 1.0, timestamp: 1_000 },
                Sample { value: f64::from_bits(STALE_NAN), timestamp: 2_000 },
                Sample { value: 0.0, timestamp: 3_000 },
            ],
        };
        let bad = TimeSeries {
            labels: vec![label("__name__", "job:rate:5m")],
            samples: vec![Sample { value: 1.0, timestamp: 1 }],
        };
        let (batch, skipped) = parse_remote_write(&body(vec![ok, bad]), "prom", "autogen", 100).unwrap();
        assert_eq!(batch.metrics.len(), 1);
        let (key, rows) = &batch.metrics[0];
        assert_eq!(key.metric, "up");
        assert_eq!(rows.timestamps, [1_000, 3_000]);
        assert_eq!(rows.point(0).tags["job"], FieldValue::Str("shoal".into()));
        assert_eq!((skipped.samples, skipped.series), (1, 1));
        assert!(skipped.first_series.unwrap().contains("job:rate:5m"));
        assert!(parse_remote_write(b"not snappy", "prom", "autogen", 100).unwrap_err().contains("snappy"));
        let garbage = snap::raw::Encoder::new().compress_vec(&[0xff; 10]).unwrap();
        assert!(parse_remote_write(&garbage, "prom", "autogen", 100).unwrap_err().contains("WriteRequest"));
    }
}
