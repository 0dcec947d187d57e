//! The JSON gateway (`POST /v3/...`), spoken with a tiny HTTP/1.1 client over TCP. The same
//! requests go to Keel and, when `etcd` is installed, to a real etcd, and the answers must be the
//! same once the member-specific header fields are blanked out.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::cluster::{Cluster, free_port};

/// An HTTP answer: status code and body.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

fn request_text(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    req
}

/// Reads the status line and headers; returns the status and whether the body is chunked.
async fn read_head(r: &mut BufReader<TcpStream>) -> (u16, bool, Option<usize>) {
    let mut line = String::new();
    r.read_line(&mut line).await.expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut chunked = false;
    let mut length = None;
    loop {
        line.clear();
        r.read_line(&mut line).await.expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if lower == "transfer-encoding: chunked" {
            chunked = true;
        }
        if let Some(n) = lower.strip_prefix("content-length:") {
            length = n.trim().parse().ok();
        }
    }
    (status, chunked, length)
}

/// One chunk of a chunked body (`None` at its end).
async fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim(), 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0; size];
    r.read_exact(&mut chunk).await.ok()?;
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf).await.ok()?;
    Some(chunk)
}

/// One request on its own connection (30 s at most).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Answer {
    tokio::time::timeout(
        Duration::from_secs(30),
        http_once(addr, method, path, body, headers),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer to {method} {path} {body} from {addr}"))
}

async fn http_once(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // A server refusing an oversized body answers and closes before it has read all of it, so
    // the send may fail part-way: the answer is still there to read.
    let _ = s
        .write_all(request_text(addr, method, path, body, headers).as_bytes())
        .await;
    let mut r = BufReader::new(s);
    let (status, chunked, length) = read_head(&mut r).await;
    let mut out = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r).await {
            out.extend_from_slice(&c);
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        r.read_exact(&mut out).await.expect("body");
    } else {
        r.read_to_end(&mut out).await.expect("body");
    }
    Answer {
        status,
        body: String::from_utf8(out).expect("utf-8 body"),
    }
}

async fn post(addr: &str, path: &str, body: &str) -> Answer {
    http(addr, "POST", path, body, &[]).await
}

async fn post_as(addr: &str, token: &str, path: &str, body: &str) -> Answer {
    http(addr, "POST", path, body, &[("Authorization", token)]).await
}

/// A streaming call: its lines as they arrive.
struct Lines {
    r: BufReader<TcpStream>,
    pending: Vec<u8>,
    ended: bool,
}

impl Lines {
    async fn open(addr: &str, path: &str, body: &str) -> (u16, Lines) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request_text(addr, "POST", path, body, &[]).as_bytes())
            .await
            .expect("send");
        let mut r = BufReader::new(s);
        let (status, chunked, _) = read_head(&mut r).await;
        assert!(chunked, "a stream is chunked");
        (
            status,
            Lines {
                r,
                pending: Vec::new(),
                ended: false,
            },
        )
    }

    /// The next line (without its newline), or the unterminated rest at the end of the stream,
    /// or `None` when the stream ended or nothing came within `within`.
    async fn next(&mut self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if self.ended {
                if self.pending.is_empty() {
                    return None;
                }
                let rest = std::mem::take(&mut self.pending);
                return Some(String::from_utf8_lossy(&rest).into_owned());
            }
            match tokio::time::timeout_at(deadline, read_chunk(&mut self.r)).await {
                Err(_) => return None,
                Ok(Some(c)) => self.pending.extend_from_slice(&c),
                Ok(None) => self.ended = true,
            }
        }
    }

    async fn json(&mut self) -> Value {
        let line = self
            .next(Duration::from_secs(10))
            .await
            .expect("a line from the stream");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }
}

/// Blanks out what differs between members and servers: the header's IDs and term, tokens.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Object(h)) = map.get_mut("header") {
                for k in ["cluster_id", "member_id", "raft_term"] {
                    h.remove(k);
                }
            }
            if let Some(t) = map.get_mut("token") {
                *t = Value::from("<token>");
            }
            for (_, v) in map.iter_mut() {
                normalize(v);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// How much of an answer must match etcd's.
#[derive(Clone, Copy)]
enum Check {
    /// Status and the whole (normalized) JSON.
    Exact,
    /// Status and the gRPC `code` of an error (the message text is Go's or Rust's own).
    Code,
}

/// The requests both servers get, in order (revisions line up because both start empty).
const SCRIPT: &[(&str, &str, Check)] = &[
    (
        "/v3/kv/put",
        r#"{"key":"Zm9v","value":"YmFy"}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/put",
        r#"{"key":"Zm9v","value":"YmF6","prev_kv":true}"#,
        Check::Exact,
    ),
    ("/v3/kv/range", r#"{"key":"Zm9v"}"#, Check::Exact),
    // Unknown fields are ignored, as etcd's gateway does.
    ("/v3/kv/range", r#"{"key":"Zm9v","bogus":1}"#, Check::Exact),
    (
        "/v3/kv/range",
        r#"{"key":"Zm9v","revision":"100"}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/range",
        r#"{"key":"Zm9v","keys_only":true,"count_only":false,"limit":1}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/range",
        r#"{"key":"AA==","range_end":"AA==","sort_order":"DESCEND","sort_target":"MOD"}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/range",
        r#"{"key":"Zm9v","sort_order":"NOPE"}"#,
        Check::Code,
    ),
    ("/v3/kv/range", r#"{"key":"Zm9v!!"}"#, Check::Code),
    ("/v3/kv/range", r#"{"key":"#, Check::Exact),
    ("/v3/kv/range", "", Check::Exact),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"key":"Zm9v","target":"VALUE","result":"EQUAL","value":"YmF6"}],"success":[{"request_put":{"key":"Zm9v","value":"cXV4"}},{"request_range":{"key":"Zm9v"}}],"failure":[{"request_delete_range":{"key":"Zm9v"}}]}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"key":"Zm9v","target":"VERSION","result":"GREATER","version":"10"}],"failure":[{"request_range":{"key":"Zm9v","count_only":true}}]}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/txn",
        r#"{"success":[{"request_put":{"key":"YQ=="}},{"request_put":{"key":"YQ=="}}]}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/deleterange",
        r#"{"key":"Zm9v","prev_kv":true}"#,
        Check::Exact,
    ),
    ("/v3/kv/deleterange", r#"{"key":"Zm9v"}"#, Check::Exact),
    ("/v3/kv/compaction", r#"{"revision":"100"}"#, Check::Exact),
    (
        "/v3/kv/compaction",
        r#"{"revision":"2","physical":true}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/range",
        r#"{"key":"Zm9v","revision":"1"}"#,
        Check::Exact,
    ),
    (
        "/v3/lease/grant",
        r#"{"TTL":"60","ID":"1000"}"#,
        Check::Exact,
    ),
    ("/v3/lease/grant", r#"{"TTL":"60","ID":1000}"#, Check::Exact),
    (
        "/v3/kv/put",
        r#"{"key":"bA==","value":"dg==","lease":"1000"}"#,
        Check::Exact,
    ),
    (
        "/v3/kv/put",
        r#"{"key":"bA==","lease":"999"}"#,
        Check::Exact,
    ),
    ("/v3/lease/leases", "{}", Check::Exact),
    ("/v3/kv/lease/leases", "{}", Check::Exact),
    ("/v3/lease/revoke", r#"{"ID":"1000"}"#, Check::Exact),
    ("/v3/kv/lease/revoke", r#"{"ID":"1000"}"#, Check::Exact),
    ("/v3/kv/range", r#"{"key":"bA=="}"#, Check::Exact),
    ("/v3/lease/timetolive", r#"{"ID":"1000"}"#, Check::Exact),
    (
        "/v3/kv/lease/timetolive",
        r#"{"ID":"1000","keys":true}"#,
        Check::Exact,
    ),
    ("/v3/kv/put", r#"{"value":"dg=="}"#, Check::Exact),
];

/// Runs [`SCRIPT`] and the auth flow against `addr`; returns each step's answer, normalized.
async fn run_script(addr: &str) -> Vec<(String, Answer)> {
    let mut out = Vec::new();
    for (path, body, check) in SCRIPT {
        let a = post(addr, path, body).await;
        out.push((format!("{path} {body}"), shape(a, *check)));
    }
    // Auth: users and roles, then access with and without a token.
    let setup = [
        (
            "/v3/auth/user/add",
            r#"{"name":"root","password":"rootpw"}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/user/add", r#"{"name":"bob","password":"bobpw"}"#),
        ("/v3/auth/role/add", r#"{"name":"app"}"#),
        (
            "/v3/auth/role/grant",
            r#"{"name":"app","perm":{"permType":"READWRITE","key":"YQ==","range_end":"Yg=="}}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"bob","role":"app"}"#),
        ("/v3/auth/role/get", r#"{"role":"app"}"#),
        ("/v3/auth/user/add", r#"{"name":"bob","password":"x"}"#),
        ("/v3/auth/enable", "{}"),
        ("/v3/kv/put", r#"{"key":"YQ==","value":"dg=="}"#),
        (
            "/v3/auth/authenticate",
            r#"{"name":"bob","password":"wrong"}"#,
        ),
    ];
    for (path, body) in setup {
        let a = post(addr, path, body).await;
        out.push((format!("{path} {body}"), shape(a, Check::Exact)));
    }
    let login = post(
        addr,
        "/v3/auth/authenticate",
        r#"{"name":"bob","password":"bobpw"}"#,
    )
    .await;
    assert_eq!(login.status, 200, "{login:?}");
    let token = login.json()["token"].as_str().expect("token").to_string();
    out.push(("authenticate bob".into(), shape(login, Check::Exact)));
    let root = post(
        addr,
        "/v3/auth/authenticate",
        r#"{"name":"root","password":"rootpw"}"#,
    )
    .await;
    let root_token = root.json()["token"].as_str().expect("token").to_string();
    for (who, tok, path, body) in [
        (
            "bob",
            token.as_str(),
            "/v3/kv/put",
            r#"{"key":"YQ==","value":"dg=="}"#,
        ),
        ("bob", token.as_str(), "/v3/kv/range", r#"{"key":"YQ=="}"#),
        (
            "bob",
            token.as_str(),
            "/v3/kv/put",
            r#"{"key":"Yw==","value":"dg=="}"#,
        ),
        (
            "bob",
            token.as_str(),
            "/v3/kv/range",
            r#"{"key":"YQ==","range_end":"Yw=="}"#,
        ),
        ("bob", token.as_str(), "/v3/auth/user/list", "{}"),
        // (No ".N" suffix: etcd would wait for its applied index to reach N.)
        ("forged", "forgedtoken", "/v3/kv/range", r#"{"key":"YQ=="}"#),
        (
            "root",
            root_token.as_str(),
            "/v3/auth/user/get",
            r#"{"name":"bob"}"#,
        ),
        ("root", root_token.as_str(), "/v3/auth/user/list", "{}"),
        ("root", root_token.as_str(), "/v3/auth/role/list", "{}"),
        (
            "root",
            root_token.as_str(),
            "/v3/auth/user/revoke",
            r#"{"name":"bob","role":"app"}"#,
        ),
        ("bob", token.as_str(), "/v3/kv/range", r#"{"key":"YQ=="}"#),
        ("root", root_token.as_str(), "/v3/auth/disable", "{}"),
    ] {
        let a = post_as(addr, tok, path, body).await;
        out.push((format!("{who} {path} {body}"), shape(a, Check::Exact)));
    }
    // Not POST, and not a route.
    let a = http(addr, "GET", "/v3/kv/range", "", &[]).await;
    out.push(("GET /v3/kv/range".into(), a));
    let a = post(addr, "/v3/kv/nope", "{}").await;
    out.push(("POST /v3/kv/nope".into(), a));
    out
}

fn shape(a: Answer, check: Check) -> Answer {
    let mut v = a.json();
    normalize(&mut v);
    if let Check::Code = check {
        v = serde_json::json!({ "code": v["code"] });
    }
    Answer {
        status: a.status,
        body: v.to_string(),
    }
}

/// Watch, keep-alive and other streams against `addr`, returned normalized.
async fn run_streams(addr: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let (status, mut w) = Lines::open(
        addr,
        "/v3/watch",
        r#"{"create_request":{"key":"dw==","prev_kv":true}}"#,
    )
    .await;
    assert_eq!(status, 200);
    let mut push = |name: &str, mut v: Value| {
        normalize(&mut v);
        out.push((name.to_string(), v));
    };
    push("watch created", w.json().await);
    // The watch stays open after the request body ended.
    for (i, value) in ["MQ==", "Mg=="].into_iter().enumerate() {
        let body = format!(r#"{{"key":"dw==","value":"{value}"}}"#);
        assert_eq!(post(addr, "/v3/kv/put", &body).await.status, 200);
        push(&format!("watch event {}", i + 1), w.json().await);
    }
    drop(w);

    // Two watches on one stream, one replaying history.
    let (_, mut w) = Lines::open(
        addr,
        "/v3/watch",
        r#"{"create_request":{"key":"dw==","start_revision":"1"}} {"create_request":{"key":"eA=="}}"#,
    )
    .await;
    for i in 0..3 {
        push(&format!("two watches {i}"), w.json().await);
    }
    drop(w);

    // Watching from a compacted revision.
    assert_eq!(
        post(addr, "/v3/kv/compaction", r#"{"revision":"3"}"#)
            .await
            .status,
        200
    );
    let (_, mut w) = Lines::open(
        addr,
        "/v3/watch",
        r#"{"create_request":{"key":"dw==","start_revision":"2"}}"#,
    )
    .await;
    push("compacted created", w.json().await);
    push("compacted canceled", w.json().await);
    drop(w);

    // Keep-alives: one answer per request, then the stream ends.
    assert_eq!(
        post(addr, "/v3/lease/grant", r#"{"TTL":"60","ID":"2000"}"#)
            .await
            .status,
        200
    );
    let (_, mut k) = Lines::open(addr, "/v3/lease/keepalive", r#"{"ID":"2000"}{"ID":2000}"#).await;
    push("keepalive 1", k.json().await);
    push("keepalive 2", k.json().await);
    assert_eq!(
        k.next(Duration::from_secs(5)).await,
        None,
        "the stream ends"
    );
    let (_, mut k) = Lines::open(addr, "/v3/lease/keepalive", r#"{"ID":"2001"}"#).await;
    push("keepalive unknown", k.json().await);
    out
}

/// A real etcd, for comparison (`None` when it is not installed).
pub(crate) struct Etcd {
    child: Child,
    pub(crate) addr: String,
    _dir: Option<tempfile::TempDir>,
}

impl Etcd {
    /// A fresh single-member etcd.
    pub(crate) async fn start() -> Option<Etcd> {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        Self::start_in(&data, "e", free_port(), Some(dir)).await
    }

    /// A single-member etcd on `data_dir` (for instance one `etcdctl snapshot restore` made
    /// for member `name` with peer URL `http://127.0.0.1:<peer>`).
    pub(crate) async fn start_in(
        data_dir: &std::path::Path,
        name: &str,
        peer: u16,
        dir: Option<tempfile::TempDir>,
    ) -> Option<Etcd> {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let client = free_port();
        let child = Command::new(bin)
            .args(["--name", name])
            .args(["--data-dir", data_dir.to_str()?])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("{name}=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let etcd = Etcd {
            child,
            addr: format!("127.0.0.1:{client}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(&etcd.addr).await.is_ok()
                && http(&etcd.addr, "GET", "/health", "", &[]).await.status == 200
            {
                return Some(etcd);
            }
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_answers_as_etcd() {
    let cluster = Cluster::start(1).await;
    let keel = cluster.endpoints()[0].clone();
    let keel_answers = run_script(&keel).await;
    let keel_streams = run_streams(&keel).await;

    // Facts that hold whether or not etcd is here to compare with.
    let get = |name: &str| {
        keel_answers
            .iter()
            .find(|(n, _)| n.starts_with(name))
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("no step {name}"))
    };
    let range = get(r#"/v3/kv/range {"key":"Zm9v"}"#).json();
    assert_eq!(range["kvs"][0]["value"], "YmF6");
    assert_eq!(range["kvs"][0]["mod_revision"], "3");
    assert_eq!(range["count"], "1");
    let a = get(r#"/v3/kv/range {"key":"Zm9v","revision":"100"}"#);
    assert_eq!(a.status, 400);
    assert_eq!(
        a.json(),
        serde_json::json!({"error":"etcdserver: mvcc: required revision is a future revision","message":"etcdserver: mvcc: required revision is a future revision","code":11})
    );
    let a = get(r#"/v3/lease/revoke {"ID":"1000"}"#);
    assert_eq!(a.status, 200);
    let a = get(r#"/v3/kv/lease/revoke {"ID":"1000"}"#);
    assert_eq!((a.status, a.json()["code"].clone()), (404, Value::from(5)));
    let a = get("bob /v3/kv/put {\"key\":\"Yw==\"");
    assert_eq!(
        (a.status, a.json()["error"].clone()),
        (403, Value::from("etcdserver: permission denied"))
    );
    let a = get("forged ");
    assert_eq!(
        (a.status, a.json()["error"].clone()),
        (401, Value::from("etcdserver: invalid auth token"))
    );
    let a = get("/v3/auth/authenticate {\"name\":\"bob\",\"password\":\"wrong\"}");
    assert_eq!(a.status, 400);
    assert_eq!(get("GET /v3/kv/range").status, 405);
    assert_eq!(get("POST /v3/kv/nope").status, 404);
    let watch_event = &keel_streams[2].1;
    assert_eq!(watch_event["result"]["events"][0]["kv"]["value"], "Mg==");
    assert_eq!(
        watch_event["result"]["events"][0]["prev_kv"]["value"],
        "MQ=="
    );

    // Routes etcd 3.4 does not have yet (3.5's), and a snapshot stream.
    let a = post(&keel, "/v3/auth/status", "{}").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["enabled"],
        Value::Null,
        "auth was disabled again: {a:?}"
    );
    let a = post(&keel, "/v3/maintenance/hashkv", "{}").await;
    assert!(a.json()["hash"].is_number(), "{a:?}");
    let a = post(&keel, "/v3/maintenance/status", "{}").await;
    assert_eq!(a.json()["version"], "3.5.16");
    let a = post(&keel, "/v3/cluster/member/list", "{}").await;
    assert_eq!(a.json()["members"][0]["name"], "m0");
    let (status, mut snap) = Lines::open(&keel, "/v3/maintenance/snapshot", "{}").await;
    assert_eq!(status, 200);
    let first = snap.json().await;
    assert!(first["result"]["blob"].is_string(), "{first}");

    let Some(etcd) = Etcd::start().await else {
        eprintln!("etcd is not installed: compared with etcd's answers skipped");
        return;
    };
    let etcd_answers = run_script(&etcd.addr).await;
    let etcd_streams = run_streams(&etcd.addr).await;
    let mut diffs = Vec::new();
    for ((name, k), (_, e)) in keel_answers.iter().zip(&etcd_answers) {
        if k != e {
            diffs.push(format!("{name}\n  keel: {k:?}\n  etcd: {e:?}"));
        }
    }
    for ((name, k), (_, e)) in keel_streams.iter().zip(&etcd_streams) {
        if k != e {
            diffs.push(format!("{name}\n  keel: {k}\n  etcd: {e}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "answers differ from etcd's:\n{}",
        diffs.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_streams_and_bad_input() {
    let cluster = Cluster::start(1).await;
    let keel = cluster.endpoints()[0].clone();

    // A malformed object in a watch request stream ends the stream with an error object.
    let (status, mut w) = Lines::open(
        &keel,
        "/v3/watch",
        r#"{"create_request":{"key":"YQ=="}} {"create_request":"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(w.json().await["result"]["created"], true);
    let end = w.json().await;
    assert_eq!(end["error"]["grpc_code"], 3, "{end}");
    assert_eq!(end["error"]["http_code"], 400, "{end}");
    assert_eq!(end["error"]["http_status"], "Bad Request", "{end}");
    assert_eq!(w.next(Duration::from_secs(5)).await, None);

    // A watch canceled by request.
    let (_, mut w) = Lines::open(
        &keel,
        "/v3/watch",
        r#"{"create_request":{"key":"YQ==","watch_id":"7"}}{"cancel_request":{"watch_id":"7"}}"#,
    )
    .await;
    assert_eq!(w.json().await["result"]["watch_id"], "7");
    let canceled = w.json().await;
    assert_eq!(canceled["result"]["canceled"], true, "{canceled}");

    // Huge and hostile bodies get errors, not a dead server.
    let big = format!(r#"{{"key":"YQ==","value":"{}"}}"#, "A".repeat(5 << 20));
    let a = post(&keel, "/v3/kv/put", &big).await;
    assert_eq!(a.status, 429, "{}", &a.body[..a.body.len().min(200)]);
    for body in [
        "[",
        "null",
        "\"x\"",
        "{\"key\":{}}",
        "{\"lease\":\"nan\"}",
        "\u{0}",
    ] {
        let a = post(&keel, "/v3/kv/put", body).await;
        assert_eq!(a.status, 400, "{body:?} -> {a:?}");
        assert_eq!(a.json()["code"], 3, "{body:?} -> {a:?}");
    }
    // Lock and election through the gateway.
    let a = post(&keel, "/v3/lease/grant", r#"{"TTL":"30"}"#).await;
    let lease = a.json()["ID"].as_str().expect("lease ID").to_string();
    let a = post(
        &keel,
        "/v3/lock/lock",
        &format!(r#"{{"name":"bG9jaw==","lease":"{lease}"}}"#),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let key = a.json()["key"].as_str().expect("lock key").to_string();
    let a = post(&keel, "/v3/lock/unlock", &format!(r#"{{"key":"{key}"}}"#)).await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = post(
        &keel,
        "/v3/election/campaign",
        &format!(r#"{{"name":"ZWw=","lease":"{lease}","value":"bWU="}}"#),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = post(&keel, "/v3/election/leader", r#"{"name":"ZWw="}"#).await;
    assert_eq!(a.json()["kv"]["value"], "bWU=", "{a:?}");
    let (_, mut obs) = Lines::open(&keel, "/v3/election/observe", r#"{"name":"ZWw="}"#).await;
    assert_eq!(obs.json().await["result"]["kv"]["value"], "bWU=");
}

/// A gateway call is counted in etcd's gRPC metrics as the gRPC method it calls (etcd's
/// gateway calls its own gRPC server, through the same interceptors), with its status code;
/// the HTTP request itself is not counted a second time.
#[tokio::test]
async fn gateway_calls_are_counted_in_grpc_metrics() {
    use crate::maintenance::metric;
    let cluster = Cluster::start(1).await;
    let keel = cluster.endpoints()[0].clone();
    let port = cluster.members[0].client_port;
    let series = |method: &str, code: &str| {
        format!(
            "grpc_server_handled_total{{grpc_code=\"{code}\",grpc_method=\"{method}\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}}"
        )
    };
    let scrape = || {
        let body = crate::maintenance::http(port, "GET", "/metrics").1;
        (
            metric(&body, &series("Put", "OK")).unwrap_or(0.0),
            metric(&body, &series("Range", "OutOfRange")).unwrap_or(0.0),
            metric(
                &body,
                "grpc_server_started_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}",
            )
            .unwrap_or(0.0),
        )
    };
    let (puts, future_ranges, started) = scrape();
    for _ in 0..2 {
        let a = post(&keel, "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let a = post(&keel, "/v3/kv/range", r#"{"key":"Zm9v","revision":"100"}"#).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(
        scrape(),
        (puts + 2.0, future_ranges + 1.0, started + 2.0),
        "two puts and one refused range through the gateway"
    );
}
