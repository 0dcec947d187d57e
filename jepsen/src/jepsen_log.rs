//! Parser for Jepsen register logs such as `shared/histories/etcd-register/*.log`.

use std::collections::BTreeMap;

use crate::history::{Op, Operation, Outcome};

#[derive(Debug, thiserror::Error)]
#[error("line {line}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub msg: String,
}

fn err(line: usize, msg: impl Into<String>) -> ParseError {
    ParseError {
        line,
        msg: msg.into(),
    }
}

fn parse_value(s: &str, line: usize) -> Result<Option<i64>, ParseError> {
    match s {
        "nil" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .map_err(|_| err(line, format!("bad value '{v}'"))),
    }
}

fn parse_pair(s: &str, line: usize) -> Result<(i64, i64), ParseError> {
    let inner = s
        .trim()
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| err(line, format!("bad cas value '{s}'")))?;
    let mut it = inner.split_whitespace();
    let a = it
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| err(line, "bad cas from"))?;
    let b = it
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| err(line, "bad cas to"))?;
    Ok((a, b))
}

/// Parses a log into operations, pairing each completion with its process's open invocation.
pub fn parse(text: &str) -> Result<Vec<Operation>, ParseError> {
    let mut open: BTreeMap<u64, (u64, String, String)> = BTreeMap::new();
    let mut ops = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let Some(pos) = raw.find("jepsen.util - ") else {
            continue;
        };
        let rest = &raw[pos + "jepsen.util - ".len()..];
        let mut tokens = rest.split_whitespace();
        let (Some(proc_s), Some(kind), Some(f)) = (tokens.next(), tokens.next(), tokens.next())
        else {
            return Err(err(line, "expected PROCESS :type :f VALUE"));
        };
        let value = tokens.collect::<Vec<_>>().join(" ");
        let Ok(process) = proc_s.parse::<u64>() else {
            continue;
        }; // nemesis and other actors
        let at = line as u64;
        match kind {
            ":invoke" => {
                if open.insert(process, (at, f.to_string(), value)).is_some() {
                    return Err(err(line, format!("process {process} invoked twice")));
                }
            }
            ":ok" | ":fail" | ":info" => {
                let (invoke, f0, invoked_value) = open.remove(&process).ok_or_else(|| {
                    err(
                        line,
                        format!("completion without invocation for process {process}"),
                    )
                })?;
                if f0 != f {
                    return Err(err(
                        line,
                        format!("completion {f} does not match invocation {f0}"),
                    ));
                }
                let outcome = match kind {
                    ":ok" => Outcome::Ok,
                    ":fail" => Outcome::Fail,
                    _ => Outcome::Info,
                };
                let op = match f {
                    ":read" => Op::Read {
                        value: if outcome == Outcome::Ok {
                            parse_value(&value, line)?
                        } else {
                            None
                        },
                    },
                    ":write" => Op::Write {
                        value: parse_value(&invoked_value, line)?
                            .ok_or_else(|| err(line, "write of nil"))?,
                    },
                    ":cas" => {
                        let (from, to) = parse_pair(&invoked_value, line)?;
                        Op::Cas { from, to }
                    }
                    other => return Err(err(line, format!("unknown function {other}"))),
                };
                let complete = if outcome == Outcome::Info {
                    u64::MAX
                } else {
                    at
                };
                ops.push(Operation {
                    process,
                    key: String::new(),
                    op,
                    outcome,
                    invoke,
                    complete,
                });
            }
            other => return Err(err(line, format!("unknown type {other}"))),
        }
    }
    // Invocations that never completed are indeterminate.
    for (process, (invoke, f, value)) in open {
        let op = match f.as_str() {
            ":write" => match parse_value(&value, 0) {
                Ok(Some(v)) => Op::Write { value: v },
                _ => continue,
            },
            ":cas" => match parse_pair(&value, 0) {
                Ok((from, to)) => Op::Cas { from, to },
                Err(_) => continue,
            },
            _ => continue,
        };
        ops.push(Operation {
            process,
            key: String::new(),
            op,
            outcome: Outcome::Info,
            invoke,
            complete: u64::MAX,
        });
    }
    Ok(ops)
}
