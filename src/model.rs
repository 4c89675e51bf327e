//! The NSDb data model: db › namespace › metric, and points with a timestamp, a numeric value,
//! dimensions and tags. Everything here is plain data plus validation; no I/O.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Longest accepted db, namespace, metric or field name; also keeps shard paths short.
pub const NAME_LEN_MAX: usize = 128;
/// Longest accepted string field value, so one point cannot blow up a block.
pub const STRING_VALUE_LEN_MAX: usize = 4096;

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

impl fmt::Display for FieldClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FieldClass::Value => "value",
            FieldClass::Dimension => "dimension",
            FieldClass::Tag => "tag",
        })
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

    pub fn validate(&self) -> Result<(), String> {
        if let Num::Dec(d) = self.value
            && !d.is_finite()
        {
            return Err(format!("value {d} is not a finite number"));
        }
        for (class, fields) in [(FieldClass::Dimension, &self.dimensions), (FieldClass::Tag, &self.tags)] {
            for (name, v) in fields {
                validate_name(&class.to_string(), name)?;
                if name == "value" || name == "timestamp" {
                    return Err(format!("{class} name {name:?} is reserved"));
                }
                match v {
                    FieldValue::Dec(d) if !d.is_finite() => {
                        return Err(format!("{class} {name:?} value {d} is not a finite number"));
                    }
                    FieldValue::Str(s) if s.len() > STRING_VALUE_LEN_MAX => {
                        return Err(format!("{class} {name:?} is longer than {STRING_VALUE_LEN_MAX} bytes"));
                    }
                    _ => {}
                }
            }
        }
        if let Some(name) = self.dimensions.keys().find(|n| self.tags.contains_key(*n)) {
            return Err(format!("field {name:?} is sent both as a dimension and as a tag"));
        }
        Ok(())
    }
}

/// A metric's schema: the union of fields seen, each with one class and one type forever.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    pub fields: BTreeMap<String, (FieldClass, FieldType)>,
}

impl Schema {
    /// The fields of `point` that this schema does not have yet, or the first contradiction.
    pub fn check(&self, point: &Point) -> Result<Vec<(String, FieldClass, FieldType)>, String> {
        let mut new_fields = Vec::new();
        let value = [("value".to_string(), FieldClass::Value, point.value.field_type())];
        let dims = point.dimensions.iter().map(|(n, v)| (n.clone(), FieldClass::Dimension, v.field_type()));
        let tags = point.tags.iter().map(|(n, v)| (n.clone(), FieldClass::Tag, v.field_type()));
        for (name, class, ty) in value.into_iter().chain(dims).chain(tags) {
            match self.fields.get(&name) {
                None => new_fields.push((name, class, ty)),
                Some(&(known_class, known_ty)) => {
                    if known_class != class {
                        return Err(format!(
                            "field {name:?} is a {known_class} in the schema but was sent as a {class}"
                        ));
                    }
                    if known_ty != ty {
                        return Err(format!("field {name:?} has type {known_ty} in the schema but was sent as {ty}"));
                    }
                }
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
        let mut p = Point { timestamp: 1, value: Num::Int(1), dimensions: BTreeMap::new(), tags: BTreeMap::new() };
        p.tags.insert("region".into(), FieldValue::Int(3));
        let err = schema.check(&p).unwrap_err();
        assert!(err.contains("region") && err.contains("VARCHAR") && err.contains("INT"), "{err}");
        p.tags.clear();
        p.dimensions.insert("region".into(), FieldValue::Str("eu".into()));
        assert!(schema.check(&p).unwrap_err().contains("dimension"));
        p.dimensions.clear();
        p.dimensions.insert("host".into(), FieldValue::Str("a".into()));
        assert_eq!(schema.check(&p).unwrap().len(), 1);
        p.value = Num::Dec(1.5);
        assert!(schema.check(&p).unwrap_err().contains("value"));
    }
}
