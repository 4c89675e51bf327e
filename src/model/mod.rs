//! The NSDb data model: db › namespace › metric, and points with a timestamp, a numeric value,
//! dimensions and tags. Everything here is plain data plus validation; no I/O.

pub mod batch;
pub mod summary;

use batch::RowBatch;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

/// Longest accepted db, namespace, metric or field name; also keeps shard paths short.
pub const NAME_LEN_MAX: usize = 128;
/// Longest accepted string field value, so one point cannot blow up a block.
pub const STRING_VALUE_LEN_MAX: usize = 4096;

/// Timestamps (epoch milliseconds) a point may carry: the span of InfluxDB's nanosecond
/// timestamps, 1677-09-21 to 2262-04-11. Far inside `i64`, so that the bounds of the shard
/// holding any accepted point (`start + interval`) cannot overflow.
pub const TIMESTAMP_MIN_MS: i64 = i64::MIN / 1_000_000;
pub const TIMESTAMP_MAX_MS: i64 = i64::MAX / 1_000_000;

pub fn check_timestamp(timestamp: i64) -> Result<(), String> {
    if (TIMESTAMP_MIN_MS..=TIMESTAMP_MAX_MS).contains(&timestamp) {
        Ok(())
    } else {
        Err(format!(
            "timestamp {timestamp} is out of range: epoch milliseconds from {TIMESTAMP_MIN_MS} to {TIMESTAMP_MAX_MS} (years 1677 to 2262)"
        ))
    }
}

/// A db, namespace, metric, dimension or tag name must match NSDb's `^[a-zA-Z][a-zA-Z0-9_]*$`.
/// The same rule keeps names safe to use as folder names.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{what} name {name:?} is invalid: it must start with a letter and contain only letters, digits and '_'"
        ));
    }
    if name.len() > NAME_LEN_MAX {
        return Err(format!("{what} name {name:?} is longer than {NAME_LEN_MAX} characters"));
    }
    Ok(())
}

/// Where a metric lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MetricKey {
    pub db: String,
    pub namespace: String,
    pub metric: String,
}

impl MetricKey {
    pub fn new(db: &str, namespace: &str, metric: &str) -> Result<Self, String> {
        validate_name("db", db)?;
        validate_name("namespace", namespace)?;
        validate_name("metric", metric)?;
        Ok(Self { db: db.into(), namespace: namespace.into(), metric: metric.into() })
    }
}

impl fmt::Display for MetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.db, self.namespace, self.metric)
    }
}

/// A shard: one metric's points in one time bucket `[start, start + sharding interval)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardId {
    pub metric: MetricKey,
    pub start: i64,
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.metric, self.start)
    }
}

/// A number as sent: NSDb keeps integers and decimals apart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Num {
    Int(i64),
    Dec(f64),
}

impl Num {
    pub fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Dec(d) => d,
        }
    }
    pub fn field_type(self) -> FieldType {
        match self {
            Num::Int(_) => FieldType::Int,
            Num::Dec(_) => FieldType::Dec,
        }
    }
}

/// A dimension or tag value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FieldValue {
    Int(i64),
    Dec(f64),
    Str(String),
}

impl FieldValue {
    pub fn field_type(&self) -> FieldType {
        match self {
            FieldValue::Int(_) => FieldType::Int,
            FieldValue::Dec(_) => FieldType::Dec,
            FieldValue::Str(_) => FieldType::Str,
        }
    }
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            FieldValue::Int(i) => (*i).into(),
            FieldValue::Dec(d) => serde_json::Number::from_f64(*d).map_or(serde_json::Value::Null, Into::into),
            FieldValue::Str(s) => s.clone().into(),
        }
    }
}

impl From<Num> for FieldValue {
    fn from(n: Num) -> Self {
        match n {
            Num::Int(i) => FieldValue::Int(i),
            Num::Dec(d) => FieldValue::Dec(d),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FieldType {
    Int,
    Dec,
    Str,
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FieldType::Int => "INT",
            FieldType::Dec => "DECIMAL",
            FieldType::Str => "VARCHAR",
        })
    }
}

/// Dimensions are free-form fields; tags are the fields NSDb groups by. A name is one or the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FieldClass {
    Value,
    Dimension,
    Tag,
}

impl FieldClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldClass::Value => "value",
            FieldClass::Dimension => "dimension",
            FieldClass::Tag => "tag",
        }
    }
}

impl fmt::Display for FieldClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One point. Dimensions and tags are kept sorted by name so equal points encode equally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub timestamp: i64,
    pub value: Num,
    pub dimensions: BTreeMap<String, FieldValue>,
    pub tags: BTreeMap<String, FieldValue>,
}

impl Point {
    pub fn field(&self, name: &str) -> Option<FieldValue> {
        match name {
            "value" => Some(self.value.into()),
            "timestamp" => Some(FieldValue::Int(self.timestamp)),
            _ => self.tags.get(name).or_else(|| self.dimensions.get(name)).cloned(),
        }
    }
}

/// A field a batch adds to a schema: name, class, type.
pub type NewField = (String, FieldClass, FieldType);

/// A metric's schema: the union of fields seen, each with one class and one type forever.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    pub fields: BTreeMap<String, (FieldClass, FieldType)>,
}

impl Schema {
    /// The fields of `batch` that this schema does not have yet, or the first contradiction
    /// (with the schema, or between points of the batch). Costs one pass over the values and
    /// one per distinct dimension/tag value, not one per point.
    pub fn check_batch(&self, batch: &RowBatch) -> Result<Vec<NewField>, String> {
        let mut new_fields: Vec<NewField> = Vec::new();
        let mut check = |name: &str, class: FieldClass, ty: FieldType| -> Result<(), String> {
            match self.fields.get(name) {
                Some(&(known_class, _)) if known_class != class => {
                    Err(format!("field {name:?} is a {known_class} in the schema but was sent as a {class}"))
                }
                Some(&(_, known_ty)) if known_ty != ty => {
                    Err(format!("field {name:?} has type {known_ty} in the schema but was sent as {ty}"))
                }
                Some(_) => Ok(()),
                None => match new_fields.iter().find(|(n, _, _)| n == name) {
                    Some((_, c, t)) if (*c, *t) != (class, ty) => Err(format!(
                        "field {name:?} is sent both as a {c} of type {t} and as a {class} of type {ty} in one batch"
                    )),
                    Some(_) => Ok(()),
                    None => {
                        new_fields.push((name.to_string(), class, ty));
                        Ok(())
                    }
                },
            }
        };
        let has_int = batch.values.iter().any(|v| matches!(v, Num::Int(_)));
        let has_dec = batch.values.iter().any(|v| matches!(v, Num::Dec(_)));
        if has_int {
            check("value", FieldClass::Value, FieldType::Int)?;
        }
        if has_dec {
            check("value", FieldClass::Value, FieldType::Dec)?;
        }
        for (name, col) in batch.fields() {
            let class = col.class.unwrap_or(FieldClass::Dimension);
            let mut types: Vec<FieldType> = col.dict.iter().map(FieldValue::field_type).collect();
            types.sort();
            types.dedup();
            for ty in types {
                check(name, class, ty)?;
            }
        }
        Ok(new_fields)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let fields: Vec<_> = self
            .fields
            .iter()
            .map(|(name, (class, ty))| {
                serde_json::json!({"name": name, "fieldClassType": class.to_string().to_uppercase(), "type": ty.to_string()})
            })
            .collect();
        serde_json::json!({ "fields": fields })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_nsdb_rule() {
        assert!(validate_name("metric", "cpu_1").is_ok());
        assert!(validate_name("metric", "1cpu").is_err());
        assert!(validate_name("metric", "_cpu").is_err());
        assert!(validate_name("metric", "cpu-1").is_err());
        assert!(validate_name("metric", "").is_err());
        assert!(validate_name("metric", &"a".repeat(NAME_LEN_MAX + 1)).is_err());
    }

    #[test]
    fn schema_rejects_type_and_class_conflicts() {
        let mut schema = Schema::default();
        schema.fields.insert("value".into(), (FieldClass::Value, FieldType::Int));
        schema.fields.insert("region".into(), (FieldClass::Tag, FieldType::Str));
        let point = |value: Num, dims: &[(&str, FieldValue)], tags: &[(&str, FieldValue)]| Point {
            timestamp: 1,
            value,
            dimensions: dims.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        };
        let check = |points: &[Point]| schema.check_batch(&RowBatch::from_points(points).unwrap());
        let err = check(&[point(Num::Int(1), &[], &[("region", FieldValue::Int(3))])]).unwrap_err();
        assert!(err.contains("region") && err.contains("VARCHAR") && err.contains("INT"), "{err}");
        let err = check(&[point(Num::Int(1), &[("region", FieldValue::Str("eu".into()))], &[])]).unwrap_err();
        assert!(err.contains("dimension"), "{err}");
        let ok = check(&[point(Num::Int(1), &[("host", FieldValue::Str("a".into()))], &[])]).unwrap();
        assert_eq!(ok, vec![("host".to_string(), FieldClass::Dimension, FieldType::Str)]);
        assert!(check(&[point(Num::Dec(1.5), &[], &[])]).unwrap_err().contains("value"));
        let mixed = [
            point(Num::Int(1), &[("cpu", FieldValue::Int(1))], &[]),
            point(Num::Int(1), &[("cpu", FieldValue::Dec(0.5))], &[]),
        ];
        assert!(check(&mixed).unwrap_err().contains("one batch"));
    }
}

/// A total order on field values: numbers by value (integers before equal decimals), then strings.
pub fn cmp_values(a: &FieldValue, b: &FieldValue) -> Ordering {
    use FieldValue::*;
    match (a, b) {
        (Str(x), Str(y)) => x.cmp(y),
        (Str(_), _) => Ordering::Greater,
        (_, Str(_)) => Ordering::Less,
        (Int(x), Int(y)) => x.cmp(y),
        _ => {
            let (x, y) = (as_number(a), as_number(b));
            x.total_cmp(&y).then_with(|| matches!(a, Dec(_)).cmp(&matches!(b, Dec(_))))
        }
    }
}

fn as_number(v: &FieldValue) -> f64 {
    match v {
        FieldValue::Int(i) => *i as f64,
        FieldValue::Dec(d) => *d,
        FieldValue::Str(_) => f64::NAN,
    }
}

impl Num {
    /// The order of [`cmp_values`] on numbers.
    pub fn total_cmp(self, other: Num) -> Ordering {
        match (self, other) {
            (Num::Dec(a), Num::Dec(b)) => a.total_cmp(&b),
            (Num::Int(a), Num::Int(b)) => a.cmp(&b),
            _ => cmp_values(&self.into(), &other.into()),
        }
    }
}

/// `FieldValue` with the total order above, usable as a map key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Key(pub FieldValue);
impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        cmp_values(&self.0, &o.0) == Ordering::Equal
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        cmp_values(&self.0, &o.0)
    }
}
