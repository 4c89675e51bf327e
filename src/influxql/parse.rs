//! A parser for the InfluxQL that Influx clients and Grafana send (a subset of InfluxDB 1.x's):
//! a lexer and a recursive descent over it. Errors name what was expected and where.

use regex::Regex;

#[derive(Debug, Clone)]
pub enum Statement {
    Select(Select),
    ShowDatabases,
    ShowMeasurements { db: Option<String> },
    ShowTagKeys { db: Option<String>, from: Option<Source> },
    ShowTagValues { db: Option<String>, from: Option<Source>, keys: KeyMatch, condition: Option<Cond> },
    ShowFieldKeys { db: Option<String>, from: Option<Source> },
    ShowRetentionPolicies { db: Option<String> },
    ShowSeries { db: Option<String>, from: Option<Source>, condition: Option<Cond> },
    CreateDatabase(String),
}

/// `db.rp.measurement`, `rp.measurement` or `measurement`.
#[derive(Debug, Clone)]
pub struct Source {
    pub db: Option<String>,
    pub rp: Option<String>,
    pub measurement: String,
}

#[derive(Debug, Clone)]
pub enum KeyMatch {
    Eq(String),
    In(Vec<String>),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct Select {
    pub fields: Vec<Projection>,
    pub from: Source,
    pub condition: Option<Cond>,
    pub group: Group,
    pub fill: Fill,
    pub descending: bool,
    pub limit: Option<usize>,
    pub offset: usize,
    pub slimit: Option<usize>,
    pub soffset: usize,
}

/// One column of a SELECT: a field, `*`, or an aggregate of a field.
#[derive(Debug, Clone)]
pub struct Projection {
    pub expr: Expr,
    pub alias: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Wildcard,
    Field(String),
    Call { func: Func, field: String, arg: Option<f64> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Count,
    Sum,
    Mean,
    Median,
    Min,
    Max,
    First,
    Last,
    Spread,
    Stddev,
    Percentile,
}

impl Func {
    pub fn name(self) -> &'static str {
        match self {
            Func::Count => "count",
            Func::Sum => "sum",
            Func::Mean => "mean",
            Func::Median => "median",
            Func::Min => "min",
            Func::Max => "max",
            Func::First => "first",
            Func::Last => "last",
            Func::Spread => "spread",
            Func::Stddev => "stddev",
            Func::Percentile => "percentile",
        }
    }

    /// A selector returns one of the points (and, alone in a statement without GROUP BY
    /// time, that point's time).
    pub fn is_selector(self) -> bool {
        matches!(self, Func::Min | Func::Max | Func::First | Func::Last | Func::Percentile)
    }

    fn parse(name: &str) -> Option<Func> {
        Some(match name.to_ascii_lowercase().as_str() {
            "count" => Func::Count,
            "sum" => Func::Sum,
            "mean" => Func::Mean,
            "median" => Func::Median,
            "min" => Func::Min,
            "max" => Func::Max,
            "first" => Func::First,
            "last" => Func::Last,
            "spread" => Func::Spread,
            "stddev" => Func::Stddev,
            "percentile" => Func::Percentile,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct Group {
    /// `time(interval, offset)`, both in ms.
    pub time: Option<(i64, i64)>,
    pub tags: Vec<String>,
    /// `GROUP BY *`: every tag.
    pub all_tags: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    Null,
    None,
    Value(f64),
    Previous,
    Linear,
}

/// A WHERE condition. Time bounds are taken out by [`Cond::time_range`]; the rest applies to
/// tags.
#[derive(Debug, Clone)]
pub enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    /// `time <op> t`, `t` in ns.
    Time(Op, i128),
    Tag {
        key: String,
        op: Op,
        value: String,
    },
    TagRegex {
        key: String,
        negated: bool,
        re: Regex,
    },
}

/// InfluxQL's comparisons are the NSDb dialect's.
pub use crate::query::plan::CmpOp as Op;

impl Cond {
    /// The time range `[from, to)` in ms that the time bounds joined by AND allow (bounds under
    /// an OR are not supported and refused at parse time).
    pub fn time_range(&self) -> (i64, i64) {
        let (mut from, mut to) = (i64::MIN, i64::MAX);
        self.narrow(&mut from, &mut to);
        (from, to)
    }

    fn narrow(&self, from: &mut i64, to: &mut i64) {
        let ms_floor = |ns: i128| ns.div_euclid(1_000_000).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        let ms_ceil = |ns: i128| (-(-ns).div_euclid(1_000_000)).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        match self {
            Cond::And(a, b) => {
                a.narrow(from, to);
                b.narrow(from, to);
            }
            Cond::Time(op, ns) => match op {
                Op::Gt => *from = (*from).max(ms_floor(*ns + 1_000_000).max(ms_ceil(*ns + 1))),
                Op::GtEq => *from = (*from).max(ms_ceil(*ns)),
                Op::Lt => *to = (*to).min(ms_ceil(*ns)),
                Op::LtEq => *to = (*to).min(ms_floor(*ns).saturating_add(1)),
                Op::Eq => {
                    *from = (*from).max(ms_ceil(*ns));
                    *to = (*to).min(ms_floor(*ns).saturating_add(1));
                }
                Op::NotEq => {}
            },
            _ => {}
        }
    }

    /// Whether a point with these tags passes the tag conditions (time ones pass).
    pub fn matches(&self, tag: &dyn Fn(&str) -> Option<String>) -> bool {
        match self {
            Cond::And(a, b) => a.matches(tag) && b.matches(tag),
            Cond::Or(a, b) => a.matches(tag) || b.matches(tag),
            Cond::Time(..) => true,
            Cond::Tag { key, op, value } => {
                let v = tag(key).unwrap_or_default();
                match op {
                    Op::Eq => &v == value,
                    Op::NotEq => &v != value,
                    Op::Lt => v.as_str() < value.as_str(),
                    Op::LtEq => v.as_str() <= value.as_str(),
                    Op::Gt => v.as_str() > value.as_str(),
                    Op::GtEq => v.as_str() >= value.as_str(),
                }
            }
            Cond::TagRegex { key, negated, re } => re.is_match(&tag(key).unwrap_or_default()) != *negated,
        }
    }

    fn has_time(&self) -> bool {
        match self {
            Cond::And(a, b) | Cond::Or(a, b) => a.has_time() || b.has_time(),
            Cond::Time(..) => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Quoted(String),
    Str(String),
    Num(f64, String),
    /// In ns.
    Duration(i128),
    Regex(String),
    Punct(&'static str),
}

/// Nanoseconds in a duration unit.
fn unit_ns(unit: &str) -> Option<i128> {
    Some(match unit {
        "ns" => 1,
        "u" | "µ" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        "w" => 604_800_000_000_000,
        _ => return None,
    })
}

fn lex(text: &str) -> Result<Vec<(Tok, usize)>, String> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let quoted = |i: &mut usize, q: char| -> Result<String, String> {
            let mut s = String::new();
            *i += 1;
            while *i < chars.len() {
                let c = chars[*i].1;
                if c == '\\' && *i + 1 < chars.len() {
                    s.push(chars[*i + 1].1);
                    *i += 2;
                    continue;
                }
                if c == q {
                    *i += 1;
                    return Ok(s);
                }
                s.push(c);
                *i += 1;
            }
            Err(format!("unterminated {q} at {at}"))
        };
        let tok = match c {
            '"' => Tok::Quoted(quoted(&mut i, '"')?),
            '\'' => Tok::Str(quoted(&mut i, '\'')?),
            '/' => {
                // A regex follows an operator that takes one; elsewhere '/' is not InfluxQL here.
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(&(_, c)) = chars.get(i) else { return Err(format!("unterminated regex at {at}")) };
                    i += 1;
                    if c == '\\' && chars.get(i).is_some_and(|&(_, n)| n == '/') {
                        s.push('/');
                        i += 1;
                    } else if c == '/' {
                        break;
                    } else {
                        s.push(c);
                    }
                }
                Tok::Regex(s)
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(|(_, n)| n.is_ascii_digit())) => {
                let start = i;
                while i < chars.len() && (chars[i].1.is_ascii_digit() || chars[i].1 == '.') {
                    i += 1;
                }
                let number: String = chars[start..i].iter().map(|(_, c)| c).collect();
                // Exponents (1e9) are read with the number.
                let mut number = number;
                if i < chars.len()
                    && matches!(chars[i].1, 'e' | 'E')
                    && chars.get(i + 1).is_some_and(|(_, n)| n.is_ascii_digit() || *n == '-' || *n == '+')
                {
                    let estart = i;
                    i += 2;
                    while i < chars.len() && chars[i].1.is_ascii_digit() {
                        i += 1;
                    }
                    number.extend(chars[estart..i].iter().map(|(_, c)| c));
                }
                let ustart = i;
                while i < chars.len() && (chars[i].1.is_ascii_alphabetic() || chars[i].1 == 'µ') {
                    i += 1;
                }
                let unit: String = chars[ustart..i].iter().map(|(_, c)| c).collect();
                if unit.is_empty() {
                    let v: f64 = number.parse().map_err(|_| format!("bad number {number:?} at {at}"))?;
                    Tok::Num(v, number)
                } else {
                    let per = unit_ns(&unit).ok_or_else(|| format!("unknown duration unit {unit:?} at {at}"))?;
                    let n: i128 = number.parse().map_err(|_| format!("bad duration {number}{unit} at {at}"))?;
                    let ns = n.checked_mul(per).ok_or_else(|| format!("duration {number}{unit} is too large"))?;
                    Tok::Duration(ns)
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].1.is_alphanumeric() || chars[i].1 == '_') {
                    i += 1;
                }
                Tok::Ident(chars[start..i].iter().map(|(_, c)| c).collect())
            }
            _ => {
                let two: String = chars[i..chars.len().min(i + 2)].iter().map(|(_, c)| c).collect();
                let p = ["!=", "<>", "<=", ">=", "=~", "!~"].into_iter().find(|p| two == *p);
                if let Some(p) = p {
                    i += 2;
                    Tok::Punct(p)
                } else {
                    i += 1;
                    Tok::Punct(match c {
                        ',' => ",",
                        '(' => "(",
                        ')' => ")",
                        ';' => ";",
                        '*' => "*",
                        '=' => "=",
                        '<' => "<",
                        '>' => ">",
                        '.' => ".",
                        '+' => "+",
                        '-' => "-",
                        _ => return Err(format!("unexpected {c:?} at {at}")),
                    })
                }
            }
        };
        out.push((tok, at));
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

type R<T> = Result<T, String>;

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    fn at(&self) -> String {
        match self.toks.get(self.pos) {
            Some((t, at)) => format!("{t:?} at char {at}"),
            None => "the end of the query".into(),
        }
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|(t, _)| t.clone());
        self.pos += 1;
        t
    }

    fn keyword(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(word)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, word: &str) -> R<()> {
        if self.keyword(word) { Ok(()) } else { Err(format!("expected {word}, found {}", self.at())) }
    }

    fn punct(&mut self, p: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Punct(q)) if *q == p) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_punct(&mut self, p: &str) -> R<()> {
        if self.punct(p) { Ok(()) } else { Err(format!("expected {p}, found {}", self.at())) }
    }

    fn ident(&mut self) -> R<String> {
        match self.next() {
            Some(Tok::Ident(s)) | Some(Tok::Quoted(s)) => Ok(s),
            _ => {
                self.pos -= 1;
                Err(format!("expected an identifier, found {}", self.at()))
            }
        }
    }

    fn number(&mut self) -> R<f64> {
        let negative = self.punct("-");
        match self.next() {
            Some(Tok::Num(v, _)) => Ok(if negative { -v } else { v }),
            _ => {
                self.pos -= 1;
                Err(format!("expected a number, found {}", self.at()))
            }
        }
    }

    fn count(&mut self) -> R<usize> {
        let v = self.number()?;
        if v < 0.0 || v.fract() != 0.0 {
            return Err(format!("expected a count, got {v}"));
        }
        Ok(v as usize)
    }

    fn on_db(&mut self) -> R<Option<String>> {
        if self.keyword("ON") { Ok(Some(self.ident()?)) } else { Ok(None) }
    }

    fn source(&mut self) -> R<Source> {
        if matches!(self.peek(), Some(Tok::Regex(_))) {
            return Err("regular expressions in FROM are not supported".into());
        }
        let mut parts = vec![self.ident()?];
        while self.punct(".") {
            // `db..m` names the default retention policy.
            if self.punct(".") {
                parts.push(String::new());
            }
            parts.push(self.ident()?);
        }
        let mut parts = parts.into_iter().rev();
        let measurement = parts.next().expect("one part at least");
        let rp = parts.next().filter(|s| !s.is_empty());
        let db = parts.next();
        if parts.next().is_some() {
            return Err("a source has at most three parts: db.rp.measurement".into());
        }
        Ok(Source { db, rp, measurement })
    }

    fn from(&mut self) -> R<Option<Source>> {
        if self.keyword("FROM") { Ok(Some(self.source()?)) } else { Ok(None) }
    }

    fn statement(&mut self) -> R<Statement> {
        if self.keyword("SELECT") {
            return self.select().map(Statement::Select);
        }
        if self.keyword("CREATE") {
            self.expect_keyword("DATABASE")?;
            return Ok(Statement::CreateDatabase(self.ident()?));
        }
        self.expect_keyword("SHOW")?;
        if self.keyword("DATABASES") {
            return Ok(Statement::ShowDatabases);
        }
        if self.keyword("MEASUREMENTS") {
            let db = self.on_db()?;
            self.skip_limits()?;
            return Ok(Statement::ShowMeasurements { db });
        }
        if self.keyword("RETENTION") {
            self.expect_keyword("POLICIES")?;
            return Ok(Statement::ShowRetentionPolicies { db: self.on_db()? });
        }
        if self.keyword("FIELD") {
            self.expect_keyword("KEYS")?;
            let db = self.on_db()?;
            let from = self.from()?;
            return Ok(Statement::ShowFieldKeys { db, from });
        }
        if self.keyword("SERIES") {
            let db = self.on_db()?;
            let from = self.from()?;
            let condition = if self.keyword("WHERE") { Some(self.or_cond()?) } else { None };
            self.skip_limits()?;
            return Ok(Statement::ShowSeries { db, from, condition });
        }
        if self.keyword("TAG") {
            if self.keyword("KEYS") {
                let db = self.on_db()?;
                let from = self.from()?;
                self.skip_limits()?;
                return Ok(Statement::ShowTagKeys { db, from });
            }
            self.expect_keyword("VALUES")?;
            let db = self.on_db()?;
            let from = self.from()?;
            self.expect_keyword("WITH")?;
            self.expect_keyword("KEY")?;
            let keys = if self.punct("=") {
                KeyMatch::Eq(self.ident()?)
            } else if self.punct("=~") {
                match self.next() {
                    Some(Tok::Regex(r)) => KeyMatch::Regex(Regex::new(&r).map_err(|e| format!("bad regex: {e}"))?),
                    _ => return Err(format!("expected a regex after =~, found {}", self.at())),
                }
            } else if self.keyword("IN") {
                self.expect_punct("(")?;
                let mut keys = vec![self.ident()?];
                while self.punct(",") {
                    keys.push(self.ident()?);
                }
                self.expect_punct(")")?;
                KeyMatch::In(keys)
            } else {
                return Err(format!("expected = , =~ or IN after WITH KEY, found {}", self.at()));
            };
            let condition = if self.keyword("WHERE") { Some(self.or_cond()?) } else { None };
            self.skip_limits()?;
            return Ok(Statement::ShowTagValues { db, from, keys, condition });
        }
        Err(format!("unsupported SHOW statement at {}", self.at()))
    }

    /// LIMIT and OFFSET of SHOW statements are accepted and ignored (all rows are returned).
    fn skip_limits(&mut self) -> R<()> {
        while self.keyword("LIMIT") || self.keyword("OFFSET") {
            self.count()?;
        }
        Ok(())
    }

    fn select(&mut self) -> R<Select> {
        let mut fields = vec![self.projection()?];
        while self.punct(",") {
            fields.push(self.projection()?);
        }
        self.expect_keyword("FROM")?;
        let from = self.source()?;
        if self.punct(",") {
            return Err("several measurements in FROM are not supported".into());
        }
        let condition = if self.keyword("WHERE") { Some(self.or_cond()?) } else { None };
        let mut group = Group::default();
        if self.keyword("GROUP") {
            self.expect_keyword("BY")?;
            loop {
                if self.punct("*") {
                    group.all_tags = true;
                } else if matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("time"))
                    && matches!(self.toks.get(self.pos + 1), Some((Tok::Punct("("), _)))
                {
                    self.pos += 2;
                    let interval = self.duration()?;
                    if interval <= 0 {
                        return Err("GROUP BY time needs an interval above 0".into());
                    }
                    let offset = if self.punct(",") { self.signed_duration()? } else { 0 };
                    self.expect_punct(")")?;
                    group.time = Some((interval, offset.rem_euclid(interval)));
                } else {
                    group.tags.push(self.ident()?);
                }
                if !self.punct(",") {
                    break;
                }
            }
        }
        let mut fill = Fill::Null;
        if self.keyword("fill") {
            self.expect_punct("(")?;
            fill = if self.keyword("null") {
                Fill::Null
            } else if self.keyword("none") {
                Fill::None
            } else if self.keyword("previous") {
                Fill::Previous
            } else if self.keyword("linear") {
                Fill::Linear
            } else {
                Fill::Value(self.number()?)
            };
            self.expect_punct(")")?;
        }
        let mut descending = false;
        if self.keyword("ORDER") {
            self.expect_keyword("BY")?;
            let field = self.ident()?;
            if !field.eq_ignore_ascii_case("time") {
                return Err(format!("only ORDER BY time is supported, not {field:?}"));
            }
            descending = self.keyword("DESC");
            if !descending {
                self.keyword("ASC");
            }
        }
        let (mut limit, mut offset, mut slimit, mut soffset) = (None, 0, None, 0);
        loop {
            if self.keyword("LIMIT") {
                limit = Some(self.count()?);
            } else if self.keyword("OFFSET") {
                offset = self.count()?;
            } else if self.keyword("SLIMIT") {
                slimit = Some(self.count()?);
            } else if self.keyword("SOFFSET") {
                soffset = self.count()?;
            } else if self.keyword("tz") {
                self.expect_punct("(")?;
                match self.next() {
                    Some(Tok::Str(tz)) if tz == "UTC" || tz == "Etc/UTC" => {}
                    _ => return Err("only tz('UTC') is supported".into()),
                }
                self.expect_punct(")")?;
            } else {
                break;
            }
        }
        Ok(Select { fields, from, condition, group, fill, descending, limit, offset, slimit, soffset })
    }

    fn projection(&mut self) -> R<Projection> {
        let expr = if self.punct("*") {
            Expr::Wildcard
        } else {
            let name = self.ident()?;
            if self.punct("(") {
                let func = Func::parse(&name).ok_or_else(|| format!("unsupported function {name}()"))?;
                let field = if self.punct("*") { "*".to_string() } else { self.ident()? };
                let arg = if self.punct(",") { Some(self.number()?) } else { None };
                self.expect_punct(")")?;
                match (func, arg) {
                    (Func::Percentile, None) => return Err("percentile() needs a percentile: percentile(f, 95)".into()),
                    (Func::Percentile, Some(p)) if !(0.0..=100.0).contains(&p) => {
                        return Err(format!("percentile {p} is not between 0 and 100"));
                    }
                    (Func::Percentile, _) | (_, None) => {}
                    (f, Some(_)) => return Err(format!("{}() takes one argument", f.name())),
                }
                Expr::Call { func, field, arg }
            } else {
                Expr::Field(name)
            }
        };
        let alias = if self.keyword("AS") { Some(self.ident()?) } else { None };
        Ok(Projection { expr, alias })
    }

    /// A duration in ms.
    fn duration(&mut self) -> R<i64> {
        match self.next() {
            Some(Tok::Duration(ns)) => Ok((ns / 1_000_000).clamp(i64::MIN as i128, i64::MAX as i128) as i64),
            _ => {
                self.pos -= 1;
                Err(format!("expected a duration such as 10m, found {}", self.at()))
            }
        }
    }

    fn signed_duration(&mut self) -> R<i64> {
        let negative = self.punct("-");
        let d = self.duration()?;
        Ok(if negative { -d } else { d })
    }

    fn or_cond(&mut self) -> R<Cond> {
        let mut left = self.and_cond()?;
        while self.keyword("OR") {
            let right = self.and_cond()?;
            if left.has_time() || right.has_time() {
                return Err("time conditions joined by OR are not supported".into());
            }
            left = Cond::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_cond(&mut self) -> R<Cond> {
        let mut left = self.cmp_cond()?;
        while self.keyword("AND") {
            let right = self.cmp_cond()?;
            left = Cond::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn cmp_cond(&mut self) -> R<Cond> {
        if self.punct("(") {
            let inner = self.or_cond()?;
            self.expect_punct(")")?;
            return Ok(inner);
        }
        let key = self.ident()?;
        let op = match self.next() {
            Some(Tok::Punct("=")) => Op::Eq,
            Some(Tok::Punct("!=")) | Some(Tok::Punct("<>")) => Op::NotEq,
            Some(Tok::Punct("<")) => Op::Lt,
            Some(Tok::Punct("<=")) => Op::LtEq,
            Some(Tok::Punct(">")) => Op::Gt,
            Some(Tok::Punct(">=")) => Op::GtEq,
            Some(Tok::Punct(p @ ("=~" | "!~"))) => {
                let negated = p == "!~";
                return match self.next() {
                    Some(Tok::Regex(r)) => {
                        Ok(Cond::TagRegex { key, negated, re: Regex::new(&r).map_err(|e| format!("bad regex: {e}"))? })
                    }
                    _ => Err(format!("expected a regex after {p}, found {}", self.at())),
                };
            }
            _ => {
                self.pos -= 1;
                return Err(format!("expected a comparison after {key:?}, found {}", self.at()));
            }
        };
        if key.eq_ignore_ascii_case("time") {
            return Ok(Cond::Time(op, self.time_value()?));
        }
        let value = match self.next() {
            Some(Tok::Str(s)) => s,
            Some(Tok::Quoted(s)) | Some(Tok::Ident(s)) => s,
            Some(Tok::Num(_, text)) => text,
            _ => {
                self.pos -= 1;
                return Err(format!("expected a tag value after {key:?}, found {}", self.at()));
            }
        };
        Ok(Cond::Tag { key, op, value })
    }

    /// A time in ns: `now() [± duration]`, an RFC3339 string, or an epoch number (ns, or with a
    /// duration unit such as `1500000000000ms`), each optionally ± a duration.
    fn time_value(&mut self) -> R<i128> {
        let base: i128 = match self.next() {
            Some(Tok::Ident(w)) if w.eq_ignore_ascii_case("now") => {
                self.expect_punct("(")?;
                self.expect_punct(")")?;
                i128::from(NOW_MS.with(|n| n.get())) * 1_000_000
            }
            Some(Tok::Str(s)) => parse_rfc3339_ns(&s)?,
            Some(Tok::Num(v, text)) if v.fract() == 0.0 => text.parse::<i128>().unwrap_or(v as i128),
            Some(Tok::Duration(ns)) => ns,
            _ => {
                self.pos -= 1;
                return Err(format!("expected a time, found {}", self.at()));
            }
        };
        let mut t = base;
        loop {
            if self.punct("-") {
                t -= i128::from(self.duration()?) * 1_000_000;
            } else if self.punct("+") {
                t += i128::from(self.duration()?) * 1_000_000;
            } else {
                return Ok(t);
            }
        }
    }
}

thread_local! {
    /// `now()` while a query is parsed (epoch ms on the node's clock).
    static NOW_MS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// An RFC3339 time (or `YYYY-MM-DD HH:MM:SS[.f]`, or a date) as epoch ns.
pub fn parse_rfc3339_ns(s: &str) -> R<i128> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    let nanos = |dt: NaiveDateTime| {
        i128::from(dt.and_utc().timestamp()) * 1_000_000_000 + i128::from(dt.and_utc().timestamp_subsec_nanos())
    };
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Ok(i128::from(dt.timestamp()) * 1_000_000_000 + i128::from(dt.timestamp_subsec_nanos()));
    }
    if let Ok(dt) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f") {
        return Ok(nanos(dt));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(nanos(d.and_hms_opt(0, 0, 0).expect("midnight")));
    }
    Err(format!("{s:?} is not an RFC3339 time"))
}

/// Parses `;`-separated statements; `now_ms` is what `now()` means.
pub fn parse(text: &str, now_ms: i64) -> Result<Vec<Statement>, String> {
    NOW_MS.with(|n| n.set(now_ms));
    let mut p = Parser { toks: lex(text)?, pos: 0 };
    let mut out = Vec::new();
    while p.pos < p.toks.len() {
        if p.punct(";") {
            continue;
        }
        out.push(p.statement()?);
        if p.pos < p.toks.len() && !p.punct(";") {
            return Err(format!("unexpected {} after a statement", p.at()));
        }
    }
    if out.is_empty() {
        return Err("empty query".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafana_queries_parse() {
        let q = r#"SELECT mean("value"), max(usage) AS peak FROM "db"."autogen"."cpu" WHERE ("host" =~ /^web/ AND region != 'us') AND time >= now() - 6h and time <= 1600000600000ms GROUP BY time(10s, 2s), "host" fill(previous) ORDER BY time DESC LIMIT 5 SLIMIT 2"#;
        let s = parse(q, 1_600_000_000_000).unwrap();
        let Statement::Select(s) = &s[0] else { panic!() };
        assert_eq!(s.fields.len(), 2);
        assert_eq!(s.fields[1].alias.as_deref(), Some("peak"));
        assert_eq!(
            (s.from.db.as_deref(), s.from.rp.as_deref(), s.from.measurement.as_str()),
            (Some("db"), Some("autogen"), "cpu")
        );
        assert_eq!(s.group.time, Some((10_000, 2_000)));
        assert_eq!(s.group.tags, ["host"]);
        assert_eq!(s.fill, Fill::Previous);
        assert!(s.descending);
        assert_eq!((s.limit, s.slimit), (Some(5), Some(2)));
        let range = s.condition.as_ref().unwrap().time_range();
        assert_eq!(range, (1_600_000_000_000 - 6 * 3_600_000, 1_600_000_600_001));
        let tags = |h: &str, r: &str| {
            let (h, r) = (h.to_string(), r.to_string());
            move |k: &str| match k {
                "host" => Some(h.clone()),
                "region" => Some(r.clone()),
                _ => None,
            }
        };
        assert!(s.condition.as_ref().unwrap().matches(&tags("web1", "eu")));
        assert!(!s.condition.as_ref().unwrap().matches(&tags("db1", "eu")));
        assert!(!s.condition.as_ref().unwrap().matches(&tags("web1", "us")));
        let shows = parse(
            "SHOW DATABASES; SHOW MEASUREMENTS ON db LIMIT 100; SHOW TAG VALUES FROM cpu WITH KEY = \"host\"; SHOW FIELD KEYS FROM \"cpu\"; SHOW RETENTION POLICIES ON \"db\"; SHOW TAG KEYS; SHOW SERIES FROM cpu; CREATE DATABASE x",
            0,
        )
        .unwrap();
        assert_eq!(shows.len(), 8);
        assert!(matches!(
            parse("SELECT value FROM m WHERE time > '2020-01-01T00:00:00Z'", 0).unwrap()[0],
            Statement::Select(_)
        ));
    }

    #[test]
    fn bad_queries_say_what_was_expected() {
        for (q, needle) in [
            ("SELECT", "identifier"),
            ("SELECT foo(value) FROM m", "unsupported function"),
            ("SELECT value FROM m WHERE time > now() - 1x", "unit"),
            ("SELECT value FROM m WHERE host = 'a' OR time > 5", "OR"),
            ("SHOW NOTHING", "SHOW"),
            ("SELECT percentile(value) FROM m", "percentile"),
            ("", "empty"),
            ("SELECT value FROM m GROUP BY time(0s)", "above 0"),
        ] {
            let e = parse(q, 0).unwrap_err();
            assert!(e.contains(needle), "{q:?}: {e}");
        }
    }
}
