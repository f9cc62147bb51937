//! A small typed reader over a parsed TOML table that records every problem
//! it meets instead of stopping at the first one.
//!
//! serde stops at the first bad field; an operator fixing a config file wants
//! the whole list at once, each line naming the dotted key and the reason.

use std::collections::BTreeSet;
use std::time::Duration;

use toml::{Table, Value};

use super::Problem;

/// One `[section]` being read. Keys that are read are remembered so that
/// [`Section::finish`] can report every key nobody asked for (a typo).
pub(super) struct Section<'a> {
    path: String,
    table: Option<&'a Table>,
    seen: BTreeSet<&'a str>,
}

impl<'a> Section<'a> {
    pub(super) fn root(table: &'a Table) -> Self {
        Section {
            path: String::new(),
            table: Some(table),
            seen: BTreeSet::new(),
        }
    }

    /// The dotted name of `key` in this section, as problems report it.
    pub(super) fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    fn value(&mut self, key: &'a str) -> Option<&'a Value> {
        self.seen.insert(key);
        self.table.and_then(|t| t.get(key))
    }

    /// A nested table; a missing one reads as empty so its defaults apply.
    pub(super) fn section(&mut self, key: &'a str, problems: &mut Vec<Problem>) -> Section<'a> {
        let path = self.key(key);
        let table = match self.value(key) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                problems.push(Problem::new(&path, wrong_type("a table", other)));
                None
            }
        };
        Section {
            path,
            table,
            seen: BTreeSet::new(),
        }
    }

    /// An array of tables (`[[key]]`), each read as a section named
    /// `key[i]`; a missing one reads as empty.
    pub(super) fn tables(&mut self, key: &'a str, problems: &mut Vec<Problem>) -> Vec<Section<'a>> {
        let path = self.key(key);
        match self.value(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match item {
                    Value::Table(table) => Some(Section {
                        path: format!("{path}[{i}]"),
                        table: Some(table),
                        seen: BTreeSet::new(),
                    }),
                    other => {
                        problems.push(Problem::new(&format!("{path}[{i}]"), wrong_type("a table", other)));
                        None
                    }
                })
                .collect(),
            Some(other) => {
                problems.push(Problem::new(&path, wrong_type("an array of tables ([[…]])", other)));
                Vec::new()
            }
        }
    }

    /// The same section, its problems from now on named under `path` (a
    /// profile is named by its name once that is known).
    pub(super) fn renamed(self, path: String) -> Self {
        Section { path, ..self }
    }

    pub(super) fn is_present(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(key))
    }

    pub(super) fn string(&mut self, key: &'a str, default: &str, problems: &mut Vec<Problem>) -> String {
        match self.value(key) {
            None => default.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                problems.push(Problem::new(&self.key(key), wrong_type("a string", other)));
                default.to_string()
            }
        }
    }

    pub(super) fn strings(&mut self, key: &'a str, problems: &mut Vec<Problem>) -> Vec<String> {
        let Some(value) = self.value(key) else {
            return Vec::new();
        };
        let Value::Array(items) = value else {
            problems.push(Problem::new(&self.key(key), wrong_type("an array of strings", value)));
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) => out.push(s.clone()),
                other => problems.push(Problem::new(
                    &format!("{}[{i}]", self.key(key)),
                    wrong_type("a string", other),
                )),
            }
        }
        out
    }

    pub(super) fn boolean(&mut self, key: &'a str, default: bool, problems: &mut Vec<Problem>) -> bool {
        match self.value(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                problems.push(Problem::new(&self.key(key), wrong_type("true or false", other)));
                default
            }
        }
    }

    pub(super) fn integer(&mut self, key: &'a str, default: u64, problems: &mut Vec<Problem>) -> u64 {
        match self.value(key) {
            None => default,
            Some(Value::Integer(n)) if *n >= 0 => *n as u64,
            Some(Value::Integer(n)) => {
                problems.push(Problem::new(&self.key(key), format!("must not be negative (got {n})")));
                default
            }
            Some(other) => {
                problems.push(Problem::new(&self.key(key), wrong_type("an integer", other)));
                default
            }
        }
    }

    /// A duration written as a string such as `"15m"`, `"30s"` or `"1h 30m"`.
    pub(super) fn duration(&mut self, key: &'a str, default: Duration, problems: &mut Vec<Problem>) -> Duration {
        match self.value(key) {
            None => default,
            Some(Value::String(s)) => match humantime::parse_duration(s.trim()) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(Problem::new(
                        &self.key(key),
                        format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"15m\", \"1h\""),
                    ));
                    default
                }
            },
            Some(other) => {
                problems.push(Problem::new(
                    &self.key(key),
                    wrong_type("a duration string such as \"30s\"", other),
                ));
                default
            }
        }
    }

    /// Reports keys present in the file that no reader asked for.
    pub(super) fn finish(self, problems: &mut Vec<Problem>) {
        let Some(table) = self.table else { return };
        for key in table.keys() {
            if !self.seen.contains(key.as_str()) {
                problems.push(Problem::new(&self.key(key), "unknown key".to_string()));
            }
        }
    }
}

fn wrong_type(expected: &str, got: &Value) -> String {
    format!("expected {expected}, found {}", got.type_str())
}
