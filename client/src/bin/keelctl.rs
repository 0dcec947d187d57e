//! keelctl: a small etcdctl built on keel-client. Human-readable output by default, `-w json`
//! for machines.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use keel_client::{
    Client, Compare, ConnectOptions, Error, EventKind, GetResponse, Op, OpResponse, TxnResponse,
    WatchEvent, WatchOptions,
};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "keelctl",
    version,
    about = "Command-line client for Keel (and etcd v3)"
)]
struct Cli {
    /// Comma-separated endpoints.
    #[arg(
        long,
        env = "KEELCTL_ENDPOINTS",
        default_value = "127.0.0.1:2379",
        value_delimiter = ',',
        global = true
    )]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(
        short = 'w',
        long = "write-out",
        value_enum,
        default_value = "simple",
        global = true
    )]
    write_out: Format,
    /// user:password (etcd auth).
    #[arg(long, env = "KEELCTL_USER", global = true)]
    user: Option<String>,
    /// Timeout of one request, e.g. 5s or 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    command_timeout: Duration,
    /// Timeout to establish a connection.
    #[arg(long, default_value = "2s", value_parser = parse_duration, global = true)]
    dial_timeout: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Simple,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Read a key or a range.
    Get {
        key: String,
        range_end: Option<String>,
        #[arg(long)]
        prefix: bool,
        #[arg(long)]
        from_key: bool,
        #[arg(long, default_value_t = 0)]
        rev: i64,
        #[arg(long, default_value_t = 0)]
        limit: i64,
        #[arg(long)]
        keys_only: bool,
        #[arg(long)]
        count_only: bool,
        #[arg(long)]
        print_value_only: bool,
        /// l (linearizable) or s (serializable).
        #[arg(long, default_value = "l")]
        consistency: String,
    },
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Lease ID in hex.
        #[arg(long)]
        lease: Option<String>,
        #[arg(long)]
        prev_kv: bool,
    },
    /// Delete a key or a range.
    Del {
        key: String,
        range_end: Option<String>,
        #[arg(long)]
        prefix: bool,
        #[arg(long)]
        from_key: bool,
        #[arg(long)]
        prev_kv: bool,
    },
    /// Watch a key or a prefix (resumes after disconnects).
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        #[arg(long, default_value_t = 0)]
        rev: i64,
        #[arg(long)]
        prev_kv: bool,
        #[arg(long)]
        progress_notify: bool,
    },
    /// A transaction read from stdin in etcdctl's format: compares, a blank line, success ops,
    /// a blank line, failure ops. Compares: `mod("k") = "5"`, `value("k") != "v"`,
    /// `create("k") > "0"`, `version("k") < "3"`, `lease("k") = "694d…"`. Ops: `put k v`,
    /// `get k [end]`, `del k [end]`.
    Txn,
    /// Leases.
    Lease {
        #[command(subcommand)]
        cmd: LeaseCmd,
    },
    /// Acquire a lock; hold it until interrupted, or run a command while holding it.
    Lock {
        name: String,
        /// Lease TTL in seconds of the lock's session.
        #[arg(long, default_value_t = 60)]
        ttl: i64,
        command: Vec<String>,
    },
    /// Campaign in an election and lead until interrupted, or observe it with --listen.
    Elect {
        name: String,
        proposal: Option<String>,
        #[arg(short, long)]
        listen: bool,
        #[arg(long, default_value_t = 60)]
        ttl: i64,
    },
    /// Cluster members.
    Member {
        #[command(subcommand)]
        cmd: MemberCmd,
    },
    /// Per-endpoint information.
    Endpoint {
        #[command(subcommand)]
        cmd: EndpointCmd,
    },
    /// Backups.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Compact the history up to a revision.
    Compact {
        revision: i64,
        #[arg(long)]
        physical: bool,
    },
}

#[derive(Subcommand)]
enum LeaseCmd {
    /// Grant a lease with a TTL in seconds.
    Grant { ttl: i64 },
    /// Revoke a lease (hex ID).
    Revoke { id: String },
    /// Keep a lease alive until interrupted (or once).
    KeepAlive {
        id: String,
        #[arg(long)]
        once: bool,
    },
    /// Remaining time of a lease.
    Ttl {
        id: String,
        #[arg(long)]
        keys: bool,
    },
    /// Every live lease.
    List,
}

#[derive(Subcommand)]
enum MemberCmd {
    /// List members.
    List,
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Status of each endpoint.
    Status,
    /// Whether each endpoint serves a linearizable read.
    Health,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Stream a backup into a file.
    Save { path: std::path::PathBuf },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|e| format!("{s}: {e}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s}: unknown unit (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_lease(s: &str) -> Result<i64> {
    i64::from_str_radix(s.trim_start_matches("0x"), 16)
        .with_context(|| format!("bad lease ID {s:?} (hex)"))
}

fn json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let mut opts = ConnectOptions::new()
        .with_request_timeout(cli.command_timeout)
        .with_connect_timeout(cli.dial_timeout);
    if let Some(u) = &cli.user {
        let (user, pass) = u.split_once(':').unwrap_or((u.as_str(), ""));
        opts = opts.with_user(user, pass);
    }
    let client = Client::connect(&cli.endpoints, opts).await?;
    let w = cli.write_out;
    match cli.cmd {
        Cmd::Get {
            key,
            range_end,
            prefix,
            from_key,
            rev,
            limit,
            keys_only,
            count_only,
            print_value_only,
            consistency,
        } => {
            let mut g = client.get(key).revision(rev).limit(limit);
            if let Some(end) = range_end {
                g = g.range_end(end);
            }
            if prefix {
                g = g.prefix();
            }
            if from_key {
                g = g.from_key();
            }
            if keys_only {
                g = g.keys_only();
            }
            if count_only {
                g = g.count_only();
            }
            if consistency == "s" {
                g = g.serializable();
            }
            let r = g.await?;
            if w == Format::Json {
                return json(&r);
            }
            print_get(&r, print_value_only, count_only);
        }
        Cmd::Put {
            key,
            value,
            lease,
            prev_kv,
        } => {
            let mut p = client.put(key, value);
            if let Some(l) = lease {
                p = p.lease(parse_lease(&l)?);
            }
            if prev_kv {
                p = p.prev_kv();
            }
            let r = p.await?;
            if w == Format::Json {
                return json(&r);
            }
            println!("OK");
            if let Some(kv) = r.prev_kv {
                println!("{}\n{}", kv.key_str(), kv.value_str());
            }
        }
        Cmd::Del {
            key,
            range_end,
            prefix,
            from_key,
            prev_kv,
        } => {
            let mut d = client.delete(key);
            if let Some(end) = range_end {
                d = d.range_end(end);
            }
            if prefix {
                d = d.prefix();
            }
            if from_key {
                d = d.from_key();
            }
            if prev_kv {
                d = d.prev_kv();
            }
            let r = d.await?;
            if w == Format::Json {
                return json(&r);
            }
            println!("{}", r.deleted);
            for kv in r.prev_kvs {
                println!("{}\n{}", kv.key_str(), kv.value_str());
            }
        }
        Cmd::Watch {
            key,
            prefix,
            rev,
            prev_kv,
            progress_notify,
        } => {
            let mut o = WatchOptions::new().start_revision(rev);
            if prefix {
                o = o.prefix();
            }
            if prev_kv {
                o = o.prev_kv();
            }
            if progress_notify {
                o = o.progress_notify();
            }
            let mut watcher = client.watch(key, o).await?;
            let mut out = std::io::stdout();
            loop {
                let ev = tokio::select! {
                    ev = watcher.next() => ev,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(ev) = ev else { return Ok(()) };
                let ev = ev?;
                if w == Format::Json {
                    json(&ev)?;
                    continue;
                }
                match ev {
                    WatchEvent::Events { events, .. } => {
                        for e in events {
                            let kind = match e.kind {
                                EventKind::Put => "PUT",
                                EventKind::Delete => "DELETE",
                            };
                            writeln!(out, "{kind}\n{}\n{}", e.kv.key_str(), e.kv.value_str())?;
                            if let Some(p) = e.prev_kv {
                                writeln!(out, "{}\n{}", p.key_str(), p.value_str())?;
                            }
                        }
                    }
                    WatchEvent::Progress { revision } => {
                        writeln!(out, "progress: revision {revision}")?
                    }
                    WatchEvent::Compacted { compact_revision } => {
                        bail!("watch compacted: history before revision {compact_revision} is gone")
                    }
                }
                out.flush()?;
            }
        }
        Cmd::Txn => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let (cmp, success, failure) = parse_txn(&input)?;
            let r = client
                .txn()
                .when(cmp)
                .and_then(success)
                .or_else(failure)
                .await?;
            if w == Format::Json {
                return json(&r);
            }
            print_txn(&r);
        }
        Cmd::Lease { cmd } => lease(&client, cmd, w).await?,
        Cmd::Lock { name, ttl, command } => {
            let lease = client.lease_grant(ttl).await?;
            let keeper = client.lease_keep_alive(lease.id).await?;
            let lock = client.lock(name, lease.id).await?;
            if command.is_empty() {
                if w == Format::Json {
                    json(&lock)?;
                } else {
                    println!("{}", String::from_utf8_lossy(&lock.key));
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = keeper.lost() => bail!("lock lost: lease {:x} expired", lease.id),
                }
            } else {
                let status = tokio::process::Command::new(&command[0])
                    .args(&command[1..])
                    .env(
                        "KEEL_LOCK_KEY",
                        String::from_utf8_lossy(&lock.key).to_string(),
                    )
                    .env("KEEL_LOCK_REVISION", lock.revision.to_string())
                    .status()
                    .await?;
                client.unlock(lock.key.clone()).await?;
                keeper.revoke().await?;
                std::process::exit(status.code().unwrap_or(1));
            }
            client.unlock(lock.key.clone()).await?;
            keeper.revoke().await?;
        }
        Cmd::Elect {
            name,
            proposal,
            listen,
            ttl,
        } => {
            if listen {
                let mut s = client.observe(name).await?;
                loop {
                    let kv = tokio::select! {
                        kv = s.next() => kv,
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                    };
                    let Some(kv) = kv else { return Ok(()) };
                    let kv = kv?;
                    if w == Format::Json {
                        json(&kv)?;
                    } else {
                        println!("{}\n{}", kv.key_str(), kv.value_str());
                    }
                }
            }
            let Some(proposal) = proposal else {
                bail!("elect needs a proposal (or --listen)")
            };
            let lease = client.lease_grant(ttl).await?;
            let keeper = client.lease_keep_alive(lease.id).await?;
            let leader = client.campaign(name, proposal.clone(), lease.id).await?;
            if w == Format::Json {
                json(&leader)?;
            } else {
                println!("{}\n{}", String::from_utf8_lossy(&leader.key), proposal);
            }
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = keeper.lost() => bail!("leadership lost: lease {:x} expired", lease.id),
            }
            client.resign(&leader).await?;
            keeper.revoke().await?;
        }
        Cmd::Member {
            cmd: MemberCmd::List,
        } => {
            let members = client.member_list().await?;
            if w == Format::Json {
                return json(&members);
            }
            for m in members {
                println!(
                    "{:x}, started, {}, {}, {}, {}",
                    m.id,
                    m.name,
                    m.peer_urls.join(","),
                    m.client_urls.join(","),
                    m.is_learner
                );
            }
        }
        Cmd::Endpoint { cmd } => {
            let mut failed = false;
            for (i, ep) in client.endpoints().iter().enumerate() {
                let one = client.pinned(i)?;
                match cmd {
                    EndpointCmd::Status => match one.status().await {
                        Ok(s) => {
                            if w == Format::Json {
                                #[derive(Serialize)]
                                struct Out<'a> {
                                    endpoint: &'a str,
                                    status: keel_client::Status,
                                }
                                json(&Out {
                                    endpoint: ep,
                                    status: s,
                                })?;
                            } else {
                                println!(
                                    "{ep}, {:x}, {}, {}, {}, {:x}, {}, {}, {}",
                                    s.header.member_id,
                                    s.version,
                                    human_bytes(s.db_size as u64),
                                    s.leader == s.header.member_id,
                                    s.leader,
                                    s.raft_term,
                                    s.raft_index,
                                    s.raft_applied_index
                                );
                            }
                        }
                        Err(e) => {
                            failed = true;
                            eprintln!("{ep}: {e}");
                        }
                    },
                    EndpointCmd::Health => {
                        let t = std::time::Instant::now();
                        match one.get("health").await.and(Ok(())) {
                            Ok(()) => println!("{ep} is healthy: took = {:?}", t.elapsed()),
                            Err(e) => {
                                failed = true;
                                println!("{ep} is unhealthy: {e}");
                            }
                        }
                    }
                }
            }
            if failed {
                std::process::exit(1);
            }
        }
        Cmd::Snapshot {
            cmd: SnapshotCmd::Save { path },
        } => snapshot_save(&client, &path).await?,
        Cmd::Compact { revision, physical } => {
            let h = client.compact(revision, physical).await?;
            if w == Format::Json {
                return json(&h);
            }
            println!("compacted revision {revision}");
        }
    }
    Ok(())
}

fn print_get(r: &GetResponse, value_only: bool, count_only: bool) {
    if count_only {
        println!("{}", r.count);
        return;
    }
    for kv in &r.kvs {
        if !value_only {
            println!("{}", kv.key_str());
        }
        println!("{}", kv.value_str());
    }
}

fn print_txn(r: &TxnResponse) {
    println!("{}", if r.succeeded { "SUCCESS" } else { "FAILURE" });
    for op in &r.responses {
        println!();
        match op {
            OpResponse::Get(g) => print_get(g, false, false),
            OpResponse::Put(_) => println!("OK"),
            OpResponse::Delete(d) => println!("{}", d.deleted),
            OpResponse::Txn(t) => print_txn(t),
        }
    }
}

async fn lease(client: &Client, cmd: LeaseCmd, w: Format) -> Result<()> {
    match cmd {
        LeaseCmd::Grant { ttl } => {
            let g = client.lease_grant(ttl).await?;
            if w == Format::Json {
                return json(&g);
            }
            println!("lease {:016x} granted with TTL({}s)", g.id, g.ttl);
        }
        LeaseCmd::Revoke { id } => {
            let id = parse_lease(&id)?;
            let h = client.lease_revoke(id).await?;
            if w == Format::Json {
                return json(&h);
            }
            println!("lease {id:016x} revoked");
        }
        LeaseCmd::KeepAlive { id, once } => {
            let id = parse_lease(&id)?;
            if once {
                let ttl = client.lease_keep_alive_once(id).await?;
                println!("lease {id:016x} keepalived with TTL({ttl})");
                return Ok(());
            }
            let keeper = client.lease_keep_alive(id).await?;
            let mut rx = keeper.subscribe();
            loop {
                if let keel_client::LeaseState::Alive { ttl, .. } = *rx.borrow_and_update() {
                    println!("lease {id:016x} keepalived with TTL({ttl})");
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = keeper.lost() => break,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            println!("lease {id:016x} expired or revoked.");
        }
        LeaseCmd::Ttl { id, keys } => {
            let id = parse_lease(&id)?;
            let t = client.lease_time_to_live(id, keys).await?;
            if w == Format::Json {
                return json(&t);
            }
            if t.ttl < 0 {
                println!("lease {id:016x} already expired");
            } else if keys {
                let ks: Vec<_> = t.keys.iter().map(|k| String::from_utf8_lossy(k)).collect();
                println!(
                    "lease {id:016x} granted with TTL({}s), remaining({}s), attached keys({:?})",
                    t.granted_ttl, t.ttl, ks
                );
            } else {
                println!(
                    "lease {id:016x} granted with TTL({}s), remaining({}s)",
                    t.granted_ttl, t.ttl
                );
            }
        }
        LeaseCmd::List => {
            let ids = client.leases().await?;
            if w == Format::Json {
                return json(&ids);
            }
            println!("found {} leases", ids.len());
            for id in ids {
                println!("{id:016x}");
            }
        }
    }
    Ok(())
}

async fn snapshot_save(client: &Client, path: &std::path::Path) -> Result<()> {
    let mut stream = match client.snapshot().await {
        Ok(s) => s,
        Err(Error::Unimplemented(m)) => bail!("the server does not support snapshots yet ({m})"),
        Err(e) => return Err(e.into()),
    };
    let part = path.with_extension("part");
    let mut file =
        std::fs::File::create(&part).with_context(|| format!("create {}", part.display()))?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta}",
        )
        .expect("progress template"),
    );
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(Error::Unimplemented(m)) => {
                let _ = std::fs::remove_file(&part);
                bail!("the server does not support snapshots yet ({m})")
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e.into());
            }
        };
        file.write_all(&chunk.blob)?;
        written += chunk.blob.len() as u64;
        bar.set_length(written + chunk.remaining_bytes);
        bar.set_position(written);
    }
    file.sync_all()?;
    std::fs::rename(&part, path)?;
    bar.finish_and_clear();
    println!(
        "Snapshot saved at {} ({})",
        path.display(),
        human_bytes(written)
    );
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Splits a line into words; double-quoted words may contain spaces and `\"`.
fn words(line: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut w = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => w.extend(chars.next()),
                    Some('"') => break,
                    Some(c) => w.push(c),
                    None => bail!("unterminated quote in {line:?}"),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                w.push(c);
                chars.next();
            }
        }
        out.push(w);
    }
    Ok(out)
}

fn parse_compare(line: &str) -> Result<Compare> {
    // target("key") op "value"
    let open = line
        .find('(')
        .context("compare: expected target(\"key\")")?;
    let close = line.rfind(')').context("compare: missing )")?;
    let target = line[..open].trim();
    let key = words(&line[open + 1..close])?
        .pop()
        .context("compare: missing key")?;
    let rest = words(&line[close + 1..])?;
    let [op, val] = rest.as_slice() else {
        bail!("compare: expected an operator and a value in {line:?}")
    };
    macro_rules! apply {
        ($to:expr, $v:expr) => {{
            let to = $to;
            match op.as_str() {
                "=" | "==" => to.eq($v),
                "!=" => to.ne($v),
                ">" => to.gt($v),
                "<" => to.lt($v),
                o => bail!("compare: unknown operator {o}"),
            }
        }};
    }
    let num = |v: &str| -> Result<i64> {
        v.parse()
            .with_context(|| format!("compare: {v:?} is not a number"))
    };
    Ok(match target {
        "value" | "val" => apply!(Compare::value(key), val.as_bytes().to_vec()),
        "mod" => apply!(Compare::mod_revision(key), num(val)?),
        "create" | "c" => apply!(Compare::create_revision(key), num(val)?),
        "version" | "ver" => apply!(Compare::version(key), num(val)?),
        "lease" => apply!(Compare::lease(key), parse_lease(val)?),
        t => bail!("compare: unknown target {t}"),
    })
}

fn parse_op(line: &str) -> Result<Op> {
    let w = words(line)?;
    Ok(
        match w.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["put", k, v] => Op::put(*k, *v),
            ["get", k] => Op::get(*k),
            ["get", k, "--prefix"] => Op::get_prefix(*k),
            ["del", k] => Op::delete(*k),
            ["del", k, "--prefix"] => Op::delete_prefix(*k),
            _ => bail!(
                "op: expected `put k v`, `get k [--prefix]` or `del k [--prefix]`, got {line:?}"
            ),
        },
    )
}

type ParsedTxn = (Vec<Compare>, Vec<Op>, Vec<Op>);

fn parse_txn(input: &str) -> Result<ParsedTxn> {
    let mut sections: Vec<Vec<&str>> = vec![Vec::new()];
    for line in input.lines() {
        if line.trim().is_empty() {
            sections.push(Vec::new());
        } else {
            sections.last_mut().expect("one section").push(line.trim());
        }
    }
    let get = |i: usize| sections.get(i).cloned().unwrap_or_default();
    let cmp = get(0)
        .into_iter()
        .map(parse_compare)
        .collect::<Result<_>>()?;
    let success = get(1).into_iter().map(parse_op).collect::<Result<_>>()?;
    let failure = get(2).into_iter().map(parse_op).collect::<Result<_>>()?;
    Ok((cmp, success, failure))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_syntax() {
        let (c, s, f) = parse_txn(
            "mod(\"k\") = \"5\"\nvalue(\"a b\") != \"x y\"\n\nput k v\n\nget k\ndel p --prefix\n",
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], Compare::mod_revision("k").eq(5));
        assert_eq!(c[1], Compare::value("a b").ne("x y"));
        assert_eq!(s, vec![Op::put("k", "v")]);
        assert_eq!(f, vec![Op::get("k"), Op::delete_prefix("p")]);
        assert!(parse_compare("nope(\"k\") = \"1\"").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
    }
}
