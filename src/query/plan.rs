//! Parsing the NSDb SQL dialect into a plan, with `sqlparser` doing the SQL.
//!
//! NSDb's non-standard parts are rewritten on sqlparser's token stream before parsing, so every
//! error still points at the user's own line and column:
//! - `NOW` becomes the current time in epoch ms;
//! - a number followed by a unit (`2h`, `30 s`, `1d`) becomes that many milliseconds, so
//!   `NOW - 2h` is plain integer arithmetic, folded to a constant;
//! - `GROUP BY INTERVAL <duration>` is cut out of the stream and kept as the plan's bucket width.

use crate::model::{FieldValue, Num};
use serde::{Deserialize, Serialize};
use sqlparser::ast::{self, Expr, SelectItem, SetExpr, Spanned, Statement as SqlStatement};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};
use std::collections::HashMap;

/// Longest accepted query text.
pub const QUERY_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Statement {
    Select(SelectPlan),
    Delete(DeletePlan),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectPlan {
    pub metric: String,
    pub projection: Projection,
    pub filter: Option<Filter>,
    pub group: Option<Group>,
    pub order: Option<Order>,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeletePlan {
    pub metric: String,
    pub filter: Option<Filter>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Projection {
    All,
    /// Named fields; `timestamp` and `value` always come back.
    Fields(Vec<String>),
    Aggregate(Aggregate),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggFn {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    First,
    Last,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Aggregate {
    /// An aggregate of the point value.
    Value(AggFn),
    /// `count(distinct field)`.
    CountDistinct(String),
}

/// `GROUP BY tag[, tag…][, INTERVAL d]`: one group per combination of the tags' values (and
/// time bucket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub tags: Vec<String>,
    /// Bucket width in milliseconds; buckets are `[k·w, (k+1)·w)`.
    pub interval: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub field: String,
    pub descending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Filter {
    Cmp { field: String, op: CmpOp, value: FieldValue },
    Like { field: String, pattern: String, negated: bool },
    In { field: String, values: Vec<FieldValue>, negated: bool },
    IsNull { field: String, negated: bool },
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
}

impl Filter {
    pub fn fields(&self, out: &mut Vec<String>) {
        match self {
            Filter::Cmp { field, .. }
            | Filter::Like { field, .. }
            | Filter::In { field, .. }
            | Filter::IsNull { field, .. } => {
                if !out.contains(field) {
                    out.push(field.clone());
                }
            }
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.fields(out);
                b.fields(out);
            }
            Filter::Not(a) => a.fields(out),
        }
    }

    /// This filter without the timestamp bounds at its top level (`timestamp >= t AND …`),
    /// for rows already cut to [`Filter::time_range`]: those bounds say exactly that range,
    /// so they need no evaluation per row. `None`: nothing else is left.
    pub fn without_time_bounds(&self) -> Option<Filter> {
        match self {
            Filter::Cmp { field, op, value: FieldValue::Int(_) } if field == "timestamp" && *op != CmpOp::NotEq => None,
            Filter::And(a, b) => match (a.without_time_bounds(), b.without_time_bounds()) {
                (Some(a), Some(b)) => Some(Filter::And(Box::new(a), Box::new(b))),
                (one, other) => one.or(other),
            },
            other => Some(other.clone()),
        }
    }

    /// A superset of the timestamps this filter can accept, as `[from, to)`.
    pub fn time_range(&self) -> (i64, i64) {
        const ALL: (i64, i64) = (i64::MIN, i64::MAX);
        match self {
            Filter::Cmp { field, op, value: FieldValue::Int(t) } if field == "timestamp" => {
                let t = *t;
                match op {
                    CmpOp::Eq => (t, t.saturating_add(1)),
                    CmpOp::Gt => (t.saturating_add(1), i64::MAX),
                    CmpOp::GtEq => (t, i64::MAX),
                    CmpOp::Lt => (i64::MIN, t),
                    CmpOp::LtEq => (i64::MIN, t.saturating_add(1)),
                    CmpOp::NotEq => ALL,
                }
            }
            Filter::In { field, values, negated: false } if field == "timestamp" => {
                let ts: Vec<i64> =
                    values.iter().filter_map(|v| if let FieldValue::Int(t) = v { Some(*t) } else { None }).collect();
                match (ts.iter().min(), ts.iter().max()) {
                    (Some(&lo), Some(&hi)) if ts.len() == values.len() => (lo, hi.saturating_add(1)),
                    _ => ALL,
                }
            }
            Filter::And(a, b) => {
                let (a, b) = (a.time_range(), b.time_range());
                (a.0.max(b.0), a.1.min(b.1))
            }
            Filter::Or(a, b) => {
                let (a, b) = (a.time_range(), b.time_range());
                (a.0.min(b.0), a.1.max(b.1))
            }
            _ => ALL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

fn at(span: sqlparser::tokenizer::Span) -> String {
    if span.start.line == 0 {
        String::new()
    } else {
        format!(" at Line: {}, Column: {}", span.start.line, span.start.column)
    }
}

fn err<T>(msg: impl Into<String>, span: sqlparser::tokenizer::Span) -> Result<T, PlanError> {
    Err(PlanError(format!("{}{}", msg.into(), at(span))))
}

fn unit_ms(word: &str) -> Option<i64> {
    Some(match word.to_ascii_lowercase().as_str() {
        "ms" => 1,
        "s" | "sec" | "second" | "seconds" => 1_000,
        "m" | "min" | "minute" | "minutes" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        "w" | "week" | "weeks" => 604_800_000,
        _ => return None,
    })
}

/// Rewrites NSDb's extensions on the token stream; returns the tokens and a GROUP BY INTERVAL.
/// The rewritten tokens, the `GROUP BY INTERVAL` width, and whether the text read `NOW`.
type Rewritten = (Vec<TokenWithSpan>, Option<i64>, bool);

fn rewrite_tokens(tokens: Vec<TokenWithSpan>, now_ms: i64) -> Result<Rewritten, PlanError> {
    let mut out: Vec<TokenWithSpan> = Vec::with_capacity(tokens.len());
    let mut reads_now = false;
    let mut iter = tokens.into_iter().filter(|t| !matches!(t.token, Token::Whitespace(_))).peekable();
    while let Some(tok) = iter.next() {
        match &tok.token {
            Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("now") => {
                reads_now = true;
                out.push(TokenWithSpan::new(Token::Number(now_ms.to_string(), false), tok.span));
            }
            Token::Number(n, _) => {
                let unit = match iter.peek() {
                    Some(TokenWithSpan { token: Token::Word(w), .. }) if w.quote_style.is_none() => unit_ms(&w.value),
                    _ => None,
                };
                match unit {
                    Some(ms) => {
                        let unit_tok = iter.next().expect("peeked");
                        let count: i64 = n
                            .parse()
                            .map_err(|_| PlanError(format!("duration {n:?} must be a whole number{}", at(tok.span))))?;
                        let total = count
                            .checked_mul(ms)
                            .ok_or_else(|| PlanError(format!("duration too large{}", at(tok.span))))?;
                        let span = tok.span.union(&unit_tok.span);
                        out.push(TokenWithSpan::new(Token::Number(total.to_string(), false), span));
                    }
                    None => out.push(tok),
                }
            }
            _ => out.push(tok),
        }
    }
    // GROUP BY …, INTERVAL <ms>, …: cut it out (with a comma next to it, and GROUP BY if
    // nothing else is grouped by), remember the width.
    let mut interval = None;
    let is_kw = |t: &TokenWithSpan, k: Keyword| matches!(&t.token, Token::Word(w) if w.keyword == k);
    let comma = |t: &TokenWithSpan| matches!(t.token, Token::Comma);
    if let Some(g) =
        (0..out.len().saturating_sub(1)).find(|&i| is_kw(&out[i], Keyword::GROUP) && is_kw(&out[i + 1], Keyword::BY))
    {
        let end = (g + 2..out.len())
            .find(|&j| [Keyword::ORDER, Keyword::LIMIT, Keyword::HAVING].iter().any(|k| is_kw(&out[j], *k)))
            .unwrap_or(out.len());
        if let Some(k) = (g + 2..end).find(|&j| is_kw(&out[j], Keyword::INTERVAL)) {
            let span = out[k].span;
            match out.get(k + 1).map(|t| &t.token) {
                Some(Token::Number(n, _)) => {
                    let ms: i64 = n
                        .parse()
                        .map_err(|_| PlanError(format!("interval {n:?} is not a whole number{}", at(span))))?;
                    if ms <= 0 {
                        return err("GROUP BY INTERVAL needs a positive duration", span);
                    }
                    interval = Some(ms);
                }
                _ => return err("GROUP BY INTERVAL needs a duration such as 1h", span),
            }
            if k + 2 < end && comma(&out[k + 2]) {
                out.drain(k..k + 3);
            } else if k > g + 2 && comma(&out[k - 1]) {
                out.drain(k - 1..k + 2);
            } else {
                out.drain(k..k + 2);
            }
            let clause_empty = out.get(g + 2).is_none_or(|t| {
                [Keyword::ORDER, Keyword::LIMIT, Keyword::HAVING].iter().any(|kw| is_kw(t, *kw))
                    || matches!(t.token, Token::EOF | Token::SemiColon)
            });
            if clause_empty {
                out.drain(g..g + 2);
            }
        }
    }
    Ok((out, interval, reads_now))
}

/// Statements parsed before, by their text. A server parses a repeated query (a dashboard's
/// refresh) from cold caches: sqlparser took 100-150 µs of a 160 µs cached answer there, 8 µs
/// in a loop. The plan of a text depends on nothing else unless it reads `NOW`, and those are
/// not kept. Bounded in count and text length; the oldest goes first. The hasher has fixed
/// keys: random ones would be drawn from the process's entropy at the first query, which the
/// simulator replays (a seed's run would depend on the seeds run before it in the process);
/// a client choosing colliding texts slows down 256 entries at most.
struct ParsedStatements {
    by_text: HashMap<String, Statement, std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>>,
    order: std::collections::VecDeque<String>,
}

const PARSED_KEPT_MAX: usize = 256;
const PARSED_TEXT_BYTES_MAX: usize = 1024;

static PARSED: std::sync::Mutex<ParsedStatements> = std::sync::Mutex::new(ParsedStatements {
    by_text: HashMap::with_hasher(std::hash::BuildHasherDefault::new()),
    order: std::collections::VecDeque::new(),
});

/// The kept statements. Nothing under the lock can leave them half changed, so a panic
/// elsewhere while it was held does not stop every later query.
fn parsed_statements() -> std::sync::MutexGuard<'static, ParsedStatements> {
    PARSED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Parses one statement of the NSDb dialect; `now_ms` is what `NOW` stands for.
pub fn parse(sql: &str, now_ms: i64) -> Result<Statement, PlanError> {
    let kept = parsed_statements().by_text.get(sql).cloned();
    if let Some(statement) = kept {
        return Ok(statement);
    }
    let (statement, reads_now) = parse_text(sql, now_ms)?;
    if !reads_now && sql.len() <= PARSED_TEXT_BYTES_MAX {
        let mut parsed = parsed_statements();
        if parsed.by_text.insert(sql.to_string(), statement.clone()).is_none() {
            parsed.order.push_back(sql.to_string());
            if parsed.order.len() > PARSED_KEPT_MAX {
                let oldest = parsed.order.pop_front().expect("more than the maximum kept");
                parsed.by_text.remove(&oldest);
            }
        }
    }
    Ok(statement)
}

/// [`parse`] without the kept statements: the statement, and whether it read `NOW`.
fn parse_text(sql: &str, now_ms: i64) -> Result<(Statement, bool), PlanError> {
    if sql.len() > QUERY_BYTES_MAX {
        return Err(PlanError(format!("the query is longer than {QUERY_BYTES_MAX} bytes")));
    }
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql).tokenize_with_location().map_err(|e| PlanError(e.to_string()))?;
    let (tokens, interval, reads_now) = rewrite_tokens(tokens, now_ms)?;
    let mut parser = sqlparser::parser::Parser::new(&dialect).with_tokens_with_locations(tokens);
    let statements =
        parser.parse_statements().map_err(|e| PlanError(e.to_string().replace("sql parser error: ", "")))?;
    let [statement] = <[SqlStatement; 1]>::try_from(statements)
        .map_err(|s| PlanError(format!("expected exactly one statement, got {}", s.len())))?;
    let statement = match statement {
        SqlStatement::Query(q) => plan_select(*q, interval).map(Statement::Select),
        SqlStatement::Delete(d) => {
            if interval.is_some() {
                return Err(PlanError("DELETE does not take GROUP BY".into()));
            }
            plan_delete(d).map(Statement::Delete)
        }
        other => err("only SELECT and DELETE statements are supported", other.span()),
    }?;
    Ok((statement, reads_now))
}

fn table_name(from: &[ast::TableWithJoins], span: sqlparser::tokenizer::Span) -> Result<String, PlanError> {
    match from {
        [ast::TableWithJoins { relation: ast::TableFactor::Table { name, .. }, joins }] if joins.is_empty() => {
            match name.0.as_slice() {
                [part] => Ok(part.as_ident().map(|i| i.value.clone()).unwrap_or_default()),
                _ => err("FROM takes one metric name (db and namespace go in the request)", name.span()),
            }
        }
        [] => err("FROM <metric> is missing", span),
        _ => err("FROM takes exactly one metric (no joins)", span),
    }
}

fn plan_delete(d: ast::Delete) -> Result<DeletePlan, PlanError> {
    let from = match &d.from {
        ast::FromTable::WithFromKeyword(f) | ast::FromTable::WithoutKeyword(f) => f,
    };
    let metric = table_name(from, d.delete_token.0.span)?;
    let filter = d.selection.as_ref().map(plan_filter).transpose()?;
    Ok(DeletePlan { metric, filter })
}

fn plan_select(q: ast::Query, interval: Option<i64>) -> Result<SelectPlan, PlanError> {
    let query_span = q.span();
    let select = match *q.body {
        SetExpr::Select(s) => s,
        other => return err("only a plain SELECT is supported", other.span()),
    };
    if select.distinct.is_some() {
        return err("SELECT DISTINCT is not supported; use count(distinct field)", select.span());
    }
    if select.having.is_some() {
        return err("HAVING is not supported", select.span());
    }
    let metric = table_name(&select.from, select.span())?;
    let projection = plan_projection(&select.projection)?;
    let filter = select.selection.as_ref().map(plan_filter).transpose()?;
    let tags: Vec<String> = match &select.group_by {
        ast::GroupByExpr::Expressions(exprs, _) => exprs
            .iter()
            .map(|e| match e {
                Expr::Identifier(id) => Ok(id.value.clone()),
                other => err("GROUP BY takes tag names and INTERVAL <duration>", other.span()),
            })
            .collect::<Result<_, _>>()?,
        g => return err("GROUP BY takes tag names and INTERVAL <duration>", g.span()),
    };
    let group = (!tags.is_empty() || interval.is_some()).then_some(Group { tags, interval });
    if group.is_some() && !matches!(projection, Projection::Aggregate(_)) {
        return err("GROUP BY needs an aggregate in SELECT, such as avg(value)", query_span);
    }
    let order = match &q.order_by {
        None => None,
        Some(ob) => match &ob.kind {
            ast::OrderByKind::Expressions(exprs) if exprs.len() == 1 => {
                let e = &exprs[0];
                let field = match &e.expr {
                    Expr::Identifier(id) => id.value.clone(),
                    other => return err("ORDER BY takes one field name", other.span()),
                };
                let descending = matches!(e.options.sort, Some(ast::OrderBySort::Desc));
                Some(Order { field, descending })
            }
            _ => return err("ORDER BY takes exactly one field name", query_span),
        },
    };
    let limit = match &q.limit_clause {
        None => None,
        Some(ast::LimitClause::LimitOffset { limit: Some(Expr::Value(v)), offset: None, limit_by })
            if limit_by.is_empty() =>
        {
            match &v.value {
                ast::Value::Number(n, _) => Some(
                    n.parse::<usize>().map_err(|_| PlanError(format!("LIMIT must be a whole number{}", at(v.span))))?,
                ),
                _ => return err("LIMIT must be a whole number", v.span),
            }
        }
        Some(other) => return err("only LIMIT <n> is supported (no OFFSET)", other.span()),
    };
    Ok(SelectPlan { metric, projection, filter, group, order, limit })
}

fn plan_projection(items: &[SelectItem]) -> Result<Projection, PlanError> {
    let mut fields = Vec::new();
    let mut aggregate = None;
    for item in items {
        let expr = match item {
            SelectItem::Wildcard(_) if items.len() == 1 => return Ok(Projection::All),
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
            other => return err("SELECT takes *, field names or one aggregate", other.span()),
        };
        match expr {
            Expr::Identifier(id) => fields.push(id.value.clone()),
            Expr::Function(f) => {
                if aggregate.is_some() {
                    return err("only one aggregate per query is supported", f.span());
                }
                aggregate = Some(plan_aggregate(f)?);
            }
            other => return err("SELECT takes *, field names or one aggregate", other.span()),
        }
    }
    match aggregate {
        Some(_) if !fields.is_empty() => err("an aggregate cannot be selected together with fields", items[0].span()),
        Some(a) => Ok(Projection::Aggregate(a)),
        None => Ok(Projection::Fields(fields)),
    }
}

fn plan_aggregate(f: &ast::Function) -> Result<Aggregate, PlanError> {
    let name = f.name.to_string().to_ascii_lowercase();
    let func = match name.as_str() {
        "count" => AggFn::Count,
        "sum" => AggFn::Sum,
        "min" => AggFn::Min,
        "max" => AggFn::Max,
        "avg" => AggFn::Avg,
        "first" => AggFn::First,
        "last" => AggFn::Last,
        _ => {
            return err(format!("unknown aggregate {name}; supported: count sum min max avg first last"), f.span());
        }
    };
    let ast::FunctionArguments::List(list) = &f.args else {
        return err(format!("{name} needs an argument, such as {name}(value)"), f.span());
    };
    let distinct = matches!(list.duplicate_treatment, Some(ast::DuplicateTreatment::Distinct));
    let arg = match list.args.as_slice() {
        [ast::FunctionArg::Unnamed(a)] => a,
        _ => return err(format!("{name} takes exactly one argument"), f.span()),
    };
    let field = match arg {
        ast::FunctionArgExpr::Wildcard => "*".to_string(),
        ast::FunctionArgExpr::Expr(Expr::Identifier(id)) => id.value.clone(),
        _ => return err(format!("{name} takes a field name or *"), f.span()),
    };
    if distinct {
        if func != AggFn::Count || field == "*" {
            return err("DISTINCT is only supported as count(distinct <field>)", f.span());
        }
        return Ok(Aggregate::CountDistinct(field));
    }
    if field == "*" && func != AggFn::Count {
        return err(format!("{name}(*) is not supported; use {name}(value)"), f.span());
    }
    if field != "*" && field != "value" {
        return err(format!("{name} aggregates the point value: write {name}(value)"), f.span());
    }
    Ok(Aggregate::Value(func))
}

fn literal(e: &Expr) -> Result<FieldValue, PlanError> {
    match e {
        Expr::Value(v) => match &v.value {
            ast::Value::Number(n, _) => {
                if let Ok(i) = n.parse::<i64>() {
                    Ok(FieldValue::Int(i))
                } else {
                    n.parse::<f64>().map(FieldValue::Dec).or_else(|_| err(format!("bad number {n}"), v.span))
                }
            }
            ast::Value::SingleQuotedString(s) | ast::Value::DoubleQuotedString(s) => Ok(FieldValue::Str(s.clone())),
            _ => err("expected a number or a 'string'", v.span),
        },
        Expr::UnaryOp { op: ast::UnaryOperator::Minus, expr } => match literal(expr)? {
            FieldValue::Int(i) => Ok(FieldValue::Int(-i)),
            FieldValue::Dec(d) => Ok(FieldValue::Dec(-d)),
            FieldValue::Str(_) => err("cannot negate a string", e.span()),
        },
        Expr::UnaryOp { op: ast::UnaryOperator::Plus, expr } => literal(expr),
        Expr::Nested(inner) => literal(inner),
        Expr::BinaryOp { left, op, right } => {
            let (l, r) = (literal(left)?, literal(right)?);
            let folded = match (l, r) {
                (FieldValue::Int(a), FieldValue::Int(b)) => match op {
                    ast::BinaryOperator::Plus => a.checked_add(b).map(FieldValue::Int),
                    ast::BinaryOperator::Minus => a.checked_sub(b).map(FieldValue::Int),
                    ast::BinaryOperator::Multiply => a.checked_mul(b).map(FieldValue::Int),
                    _ => None,
                },
                (a @ (FieldValue::Int(_) | FieldValue::Dec(_)), b @ (FieldValue::Int(_) | FieldValue::Dec(_))) => {
                    let (a, b) = (num_f64(&a), num_f64(&b));
                    match op {
                        ast::BinaryOperator::Plus => Some(FieldValue::Dec(a + b)),
                        ast::BinaryOperator::Minus => Some(FieldValue::Dec(a - b)),
                        ast::BinaryOperator::Multiply => Some(FieldValue::Dec(a * b)),
                        _ => None,
                    }
                }
                _ => None,
            };
            folded.map_or_else(|| err("only + - * of numbers (and NOW - 1h) are supported in values", e.span()), Ok)
        }
        _ => err("expected a literal value", e.span()),
    }
}

fn num_f64(v: &FieldValue) -> f64 {
    match v {
        FieldValue::Int(i) => *i as f64,
        FieldValue::Dec(d) => *d,
        FieldValue::Str(_) => f64::NAN,
    }
}

fn field_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(id) => Some(id.value.clone()),
        Expr::Nested(inner) => field_name(inner),
        _ => None,
    }
}

fn plan_filter(e: &Expr) -> Result<Filter, PlanError> {
    use ast::BinaryOperator as B;
    match e {
        Expr::Nested(inner) => plan_filter(inner),
        Expr::BinaryOp { left, op: B::And, right } => {
            Ok(Filter::And(Box::new(plan_filter(left)?), Box::new(plan_filter(right)?)))
        }
        Expr::BinaryOp { left, op: B::Or, right } => {
            Ok(Filter::Or(Box::new(plan_filter(left)?), Box::new(plan_filter(right)?)))
        }
        Expr::UnaryOp { op: ast::UnaryOperator::Not, expr } => Ok(Filter::Not(Box::new(plan_filter(expr)?))),
        Expr::BinaryOp { left, op, right } => {
            let cmp = match op {
                B::Eq => CmpOp::Eq,
                B::NotEq => CmpOp::NotEq,
                B::Lt => CmpOp::Lt,
                B::LtEq => CmpOp::LtEq,
                B::Gt => CmpOp::Gt,
                B::GtEq => CmpOp::GtEq,
                _ => return err(format!("operator {op} is not supported in WHERE"), e.span()),
            };
            match (field_name(left), field_name(right)) {
                (Some(field), None) => Ok(Filter::Cmp { field, op: cmp, value: literal(right)? }),
                (None, Some(field)) => {
                    let flipped = match cmp {
                        CmpOp::Lt => CmpOp::Gt,
                        CmpOp::LtEq => CmpOp::GtEq,
                        CmpOp::Gt => CmpOp::Lt,
                        CmpOp::GtEq => CmpOp::LtEq,
                        other => other,
                    };
                    Ok(Filter::Cmp { field, op: flipped, value: literal(left)? })
                }
                _ => err("a comparison needs a field on one side and a value on the other", e.span()),
            }
        }
        Expr::Like { negated, expr, pattern, escape_char: None, any: false } => {
            let field = field_name(expr)
                .ok_or_else(|| PlanError(format!("LIKE needs a field on the left{}", at(expr.span()))))?;
            match literal(pattern)? {
                FieldValue::Str(pattern) => Ok(Filter::Like { field, pattern, negated: *negated }),
                _ => err("LIKE needs a 'string' pattern", pattern.span()),
            }
        }
        Expr::In { expr, target: ast::InTarget::List(list), negated, .. } => {
            let field = field_name(expr)
                .ok_or_else(|| PlanError(format!("IN needs a field on the left{}", at(expr.span()))))?;
            let values = list.iter().map(literal).collect::<Result<Vec<_>, _>>()?;
            Ok(Filter::In { field, values, negated: *negated })
        }
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
            let field =
                field_name(inner).ok_or_else(|| PlanError(format!("IS NULL needs a field{}", at(inner.span()))))?;
            Ok(Filter::IsNull { field, negated: matches!(e, Expr::IsNotNull(_)) })
        }
        Expr::Between { expr, negated, low, high } => {
            let field =
                field_name(expr).ok_or_else(|| PlanError(format!("BETWEEN needs a field{}", at(expr.span()))))?;
            let range = Filter::And(
                Box::new(Filter::Cmp { field: field.clone(), op: CmpOp::GtEq, value: literal(low)? }),
                Box::new(Filter::Cmp { field, op: CmpOp::LtEq, value: literal(high)? }),
            );
            Ok(if *negated { Filter::Not(Box::new(range)) } else { range })
        }
        _ => err("unsupported condition in WHERE", e.span()),
    }
}

/// Used by tests and by the executor to compare a literal against an integer timestamp.
pub fn as_num(v: &FieldValue) -> Option<Num> {
    match v {
        FieldValue::Int(i) => Some(Num::Int(*i)),
        FieldValue::Dec(d) => Some(Num::Dec(*d)),
        FieldValue::Str(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(sql: &str) -> SelectPlan {
        match parse(sql, 10_000_000).unwrap() {
            Statement::Select(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nsdb_extensions() {
        let p =
            select("select avg(value) from cpu where timestamp > now - 2h and region = 'eu' group by interval 30 m");
        assert_eq!(p.group, Some(Group { tags: vec![], interval: Some(1_800_000) }));
        assert_eq!(p.projection, Projection::Aggregate(Aggregate::Value(AggFn::Avg)));
        let filter = p.filter.unwrap();
        assert_eq!(filter.time_range(), (10_000_000 - 7_200_000 + 1, i64::MAX));
        // Within that range only the tag condition is left to check per row.
        match filter.without_time_bounds() {
            Some(Filter::Cmp { field, .. }) => assert_eq!(field, "region"),
            other => panic!("{other:?}"),
        }
        let p = select("SELECT count(distinct host) FROM cpu GROUP BY region ORDER BY value DESC LIMIT 3");
        assert_eq!(p.projection, Projection::Aggregate(Aggregate::CountDistinct("host".into())));
        assert_eq!(p.group, Some(Group { tags: vec!["region".into()], interval: None }));
        assert_eq!(p.order, Some(Order { field: "value".into(), descending: true }));
        assert_eq!(p.limit, Some(3));
        let p = select("select * from m where 5 < value or host like 'a%' and not x is null");
        assert!(matches!(p.filter, Some(Filter::Or(..))));
    }

    #[test]
    fn errors_point_at_the_problem() {
        for (sql, needle) in [
            ("select * form m", "Line: 1, Column"),
            ("select avg(value) from m group by interval", "duration"),
            ("select median(value) from m", "Line: 1, Column: 8"),
            ("select value from m group by region", "aggregate"),
            ("select * from a, b", "one metric"),
            ("drop table m", "only SELECT and DELETE"),
            ("select * from m where value + 1 > 2", "field on one side"),
        ] {
            let e = parse(sql, 0).unwrap_err().0;
            assert!(e.contains(needle), "{sql}: {e}");
        }
    }

    #[test]
    fn delete_with_filter() {
        match parse("DELETE FROM m WHERE timestamp < 100", 0).unwrap() {
            Statement::Delete(d) => {
                assert_eq!(d.metric, "m");
                assert_eq!(d.filter.unwrap().time_range(), (i64::MIN, 100));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_statement_parsed_again_is_the_same_unless_it_reads_now() {
        let sql = "SELECT max(value) FROM kept_statement WHERE host = 'h7' AND timestamp < 5";
        let first = parse(sql, 0).unwrap();
        assert_eq!(parse(sql, 99).unwrap(), first);
        assert_eq!(parse_text(sql, 99).unwrap(), (first, false));
        // NOW is the time of each parse, never of an earlier one.
        let sql = "SELECT count(*) FROM kept_statement WHERE timestamp > now - 1s";
        let range = |now_ms| match parse(sql, now_ms).unwrap() {
            Statement::Select(s) => s.filter.unwrap().time_range(),
            other => panic!("{other:?}"),
        };
        assert_eq!(range(10_000), (9_001, i64::MAX));
        assert_eq!(range(20_000), (19_001, i64::MAX));
        // More texts than are kept: every one still parses to its own statement.
        for i in 0..PARSED_KEPT_MAX + 10 {
            let sql = format!("SELECT * FROM kept_statement LIMIT {}", i + 1);
            let Statement::Select(s) = parse(&sql, 0).unwrap() else { panic!("{sql}") };
            assert_eq!(s.limit, Some(i + 1));
        }
        let kept = parsed_statements().by_text.len();
        assert!(kept <= PARSED_KEPT_MAX);
    }
}
