//! The catalog: every metric's schema, held in memory and persisted in the data dir.
//! On a single node it is a plain map written atomically; the cluster issue makes the same
//! interface a CRDT synced by anti-entropy, so callers do not change.

use crate::model::batch::RowBatch;
use crate::model::{FieldClass, FieldType, MetricKey, NewField, Schema};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A point contradicts the schema (or another point of the same batch): a client error.
    #[error("metric {metric}: {message}")]
    Conflict { metric: String, message: String },
    #[error("catalog file {path}: {message}")]
    Storage { path: String, message: String },
}

pub struct Catalog {
    path: PathBuf,
    schemas: RwLock<BTreeMap<MetricKey, Schema>>,
    /// Serializes read-modify-persist cycles; readers only take `schemas`.
    persist: Mutex<()>,
}

impl Catalog {
    pub fn open(data_dir: &Path) -> Result<Self, CatalogError> {
        let path = data_dir.join("catalog.bin");
        let err = |message: String| CatalogError::Storage { path: path.display().to_string(), message };
        let schemas = match std::fs::read(&path) {
            Ok(bytes) => {
                if bytes.len() < 4 {
                    return Err(err("truncated".into()));
                }
                let (body, crc) = bytes.split_at(bytes.len() - 4);
                if crc32fast::hash(body).to_le_bytes() != crc {
                    return Err(err("fails its checksum".into()));
                }
                let list: Vec<(MetricKey, Schema)> = postcard::from_bytes(body).map_err(|e| err(e.to_string()))?;
                list.into_iter().collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Self { path, schemas: RwLock::new(schemas), persist: Mutex::new(()) })
    }

    fn save(&self, schemas: &BTreeMap<MetricKey, Schema>) -> Result<(), CatalogError> {
        let list: Vec<(&MetricKey, &Schema)> = schemas.iter().collect();
        let mut bytes = postcard::to_stdvec(&list).expect("schemas encode");
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        crate::storage::write_atomic(&self.path, &bytes)
            .map_err(|e| CatalogError::Storage { path: self.path.display().to_string(), message: e.to_string() })
    }

    pub fn schema(&self, key: &MetricKey) -> Option<Schema> {
        self.schemas.read().expect("catalog lock").get(key).cloned()
    }

    /// Checks every point of a batch against the schemas and extends them with new fields,
    /// all or nothing across all the batch's metrics.
    pub fn admit(&self, batch: &[(MetricKey, RowBatch)]) -> Result<(), CatalogError> {
        let mut additions: Vec<(&MetricKey, Vec<NewField>)> = Vec::new();
        {
            let schemas = self.schemas.read().expect("catalog lock");
            let empty = Schema::default();
            for (key, rows) in batch {
                let known = schemas.get(key).unwrap_or(&empty);
                let added = known
                    .check_batch(rows)
                    .map_err(|message| CatalogError::Conflict { metric: key.to_string(), message })?;
                if !added.is_empty() {
                    additions.push((key, added));
                }
            }
        }
        if additions.is_empty() {
            return Ok(());
        }
        let _persist = self.persist.lock().expect("catalog persist lock");
        let mut all = self.schemas.read().expect("catalog lock").clone();
        for (key, added) in additions {
            // Another writer may have added the same fields since we looked: re-check.
            let current = all.entry(key.clone()).or_default();
            for (name, class, ty) in added {
                match current.fields.get(&name) {
                    Some(&(c, t)) if (c, t) != (class, ty) => {
                        return Err(CatalogError::Conflict {
                            metric: key.to_string(),
                            message: format!(
                                "field {name:?} is a {c} of type {t} in the schema but was sent as a {class} of type {ty}"
                            ),
                        });
                    }
                    Some(_) => {}
                    None => {
                        current.fields.insert(name, (class, ty));
                    }
                }
            }
        }
        self.save(&all)?;
        *self.schemas.write().expect("catalog lock") = all;
        Ok(())
    }

    pub fn drop_metric(&self, key: &MetricKey) -> Result<bool, CatalogError> {
        let _persist = self.persist.lock().expect("catalog persist lock");
        let mut all = self.schemas.read().expect("catalog lock").clone();
        let existed = all.remove(key).is_some();
        if existed {
            self.save(&all)?;
            *self.schemas.write().expect("catalog lock") = all;
        }
        Ok(existed)
    }

    pub fn metrics(&self) -> Vec<MetricKey> {
        self.schemas.read().expect("catalog lock").keys().cloned().collect()
    }

    /// Field types of a metric, for the query planner.
    pub fn field(&self, key: &MetricKey, name: &str) -> Option<(FieldClass, FieldType)> {
        self.schemas.read().expect("catalog lock").get(key).and_then(|s| s.fields.get(name).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FieldValue, Num, Point};

    #[test]
    fn admit_is_all_or_nothing_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        let mut a =
            Point { timestamp: 1, value: Num::Int(1), dimensions: Default::default(), tags: Default::default() };
        a.tags.insert("region".into(), FieldValue::Str("eu".into()));
        let mut b = a.clone();
        b.tags.insert("region".into(), FieldValue::Int(1));
        b.dimensions.insert("host".into(), FieldValue::Str("h".into()));
        let other = MetricKey::new("d", "n", "other").unwrap();
        let rows = |p: &[Point]| RowBatch::from_points(p).unwrap();
        let batch = vec![(other.clone(), rows(&[a.clone()])), (key.clone(), rows(&[a.clone(), b]))];
        let err = cat.admit(&batch).unwrap_err().to_string();
        assert!(err.contains("region") && err.contains("one batch"), "{err}");
        assert!(cat.schema(&key).is_none() && cat.schema(&other).is_none(), "a rejected batch changes no schema");
        cat.admit(&[(key.clone(), rows(&[a]))]).unwrap();
        drop(cat);
        let cat = Catalog::open(dir.path()).unwrap();
        assert_eq!(cat.field(&key, "region"), Some((FieldClass::Tag, FieldType::Str)));
        assert!(cat.drop_metric(&key).unwrap());
        assert!(cat.metrics().is_empty());
    }
}
