//! What the aggregates need to know about a run of points: count, exact sums, extremes, and the
//! first and last point. A segment keeps one per block, so an aggregate over blocks that lie
//! wholly inside its time range and bucket reads these instead of the points; a query folds
//! points into the same shape, so both give the same answer.

use super::Num;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    /// Integers sum exactly; decimals apart.
    pub int_sum: i128,
    pub dec_sum: f64,
    pub any_dec: bool,
    pub min: Option<Num>,
    pub max: Option<Num>,
    pub first: Option<(i64, Num)>,
    pub last: Option<(i64, Num)>,
}

impl Summary {
    pub fn add(&mut self, ts: i64, v: Num) {
        self.add_to_sum(v);
        self.keep_extremes(Some(v), Some(v), Some((ts, v)), Some((ts, v)));
    }

    /// Counts and sums `v` only: all that `count`, `sum` and `avg` read, and a quarter of the
    /// work of [`Summary::add`].
    pub fn add_to_sum(&mut self, v: Num) {
        self.count += 1;
        match v {
            Num::Int(i) => self.int_sum += i128::from(i),
            Num::Dec(d) => {
                self.dec_sum += d;
                self.any_dec = true;
            }
        }
    }

    /// Folds candidate extremes in. Ties on the timestamp break by value, so first/last do not
    /// depend on the order in which blocks and shards were read.
    fn keep_extremes(
        &mut self,
        min: Option<Num>,
        max: Option<Num>,
        first: Option<(i64, Num)>,
        last: Option<(i64, Num)>,
    ) {
        let earlier = |a: (i64, Num), b: (i64, Num)| a.0.cmp(&b.0).then_with(|| a.1.total_cmp(b.1));
        if let Some(v) = min
            && self.min.is_none_or(|m| v.total_cmp(m) == Ordering::Less)
        {
            self.min = Some(v);
        }
        if let Some(v) = max
            && self.max.is_none_or(|m| v.total_cmp(m) == Ordering::Greater)
        {
            self.max = Some(v);
        }
        if let Some(f) = first
            && self.first.is_none_or(|x| earlier(f, x) == Ordering::Less)
        {
            self.first = Some(f);
        }
        if let Some(l) = last
            && self.last.is_none_or(|x| earlier(l, x) == Ordering::Greater)
        {
            self.last = Some(l);
        }
    }

    pub fn merge(&mut self, o: &Summary) {
        self.merge_sums(o);
        self.keep_extremes(o.min, o.max, o.first, o.last);
    }

    /// Merges the count and sums of `o` only (see [`Summary::add_to_sum`]).
    pub fn merge_sums(&mut self, o: &Summary) {
        self.count += o.count;
        self.int_sum += o.int_sum;
        self.dec_sum += o.dec_sum;
        self.any_dec |= o.any_dec;
    }

    /// The sum, exact for integers.
    pub fn sum(&self) -> Num {
        if self.any_dec {
            Num::Dec(self.int_sum as f64 + self.dec_sum)
        } else {
            i64::try_from(self.int_sum).map_or(Num::Dec(self.int_sum as f64), Num::Int)
        }
    }

    pub fn mean(&self) -> f64 {
        (self.int_sum as f64 + self.dec_sum) / self.count as f64
    }
}
