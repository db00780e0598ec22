//! Asking applications to give GPU memory back: which processes can be
//! asked ([`asker_for`]: ComfyUI, ollama), where they listen (from the
//! process's command line and environment), and the asking itself:
//! ComfyUI's `POST /free` and ollama's `keep_alive: 0`.
//!
//! Deciding *when* to ask is not done here. Everything is best-effort: a
//! missing application is an error value, never a panic.
//!
//! Length: two small HTTP clients and their parsers; a third of it is tests.

use std::{
    collections::BTreeMap,
    fmt,
    io::{self, ErrorKind},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::{debug, warn};

use crate::{model::procs::ProcInfo, observe::escape::esc};

/// How long one HTTP exchange (connect, send, receive) may take in total.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// ComfyUI's port when its command line does not name one.
pub const COMFYUI_DEFAULT_PORT: u16 = 8188;

/// ollama's port when `OLLAMA_HOST` does not name one.
pub const OLLAMA_DEFAULT_PORT: u16 = 11434;

/// The body ComfyUI's `POST /free` gets: unload every model and free the
/// cached memory.
pub const COMFYUI_FREE_BODY: &str = r#"{"unload_models": true, "free_memory": true}"#;

/// Responses larger than this are refused; the endpoints used here answer
/// with a few kilobytes at most.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// How much of an error response's body an [`AskError`] quotes.
const QUOTED_BODY_BYTES: usize = 200;

/// Environment variables the askers read (`OLLAMA_HOST`): the process table
/// must keep them for [`asker_for`] to find the right address.
pub const ENV_KEYS: &[&str] = &["OLLAMA_HOST"];

// ---------------------------------------------------------------------------
// Which processes can be asked
// ---------------------------------------------------------------------------

/// An application that can be asked to give GPU memory back, and where it
/// listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AskTarget {
    /// ComfyUI: `POST /free`.
    ComfyUi(SocketAddr),
    /// An ollama server: unload every loaded model.
    Ollama(SocketAddr),
}

impl AskTarget {
    pub fn addr(&self) -> SocketAddr {
        match *self {
            AskTarget::ComfyUi(addr) | AskTarget::Ollama(addr) => addr,
        }
    }

    /// The application's name, for messages.
    pub fn app(&self) -> &'static str {
        match self {
            AskTarget::ComfyUi(_) => "ComfyUI",
            AskTarget::Ollama(_) => "ollama",
        }
    }

    /// Asks it to give its GPU memory back ([`ask_comfyui`],
    /// [`ask_ollama`]); the answer says what it did, for the log.
    pub async fn ask(self) -> Result<String, AskError> {
        match self {
            AskTarget::ComfyUi(addr) => {
                ask_comfyui(addr).await?;
                Ok(format!("{self} freed its VRAM"))
            }
            AskTarget::Ollama(addr) => {
                let models = ask_ollama(addr).await?;
                Ok(if models.is_empty() {
                    format!("{self} had no model loaded")
                } else {
                    format!("{self} unloaded {}", models.join(", "))
                })
            }
        }
    }
}

impl fmt::Display for AskTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.app(), self.addr())
    }
}

/// Whether `info` is a process corral can ask to give GPU memory back, and
/// where it listens:
///
/// - **ComfyUI**: an argument ends in `main.py`, and an argument or the
///   working directory contains `comfy` (any case): `python main.py` in a
///   ComfyUI checkout, or `python ~/ComfyUI/main.py`. The address is from
///   its command line ([`comfyui_addr`]).
/// - **ollama**: the executable ends in `/ollama` and `serve` is an
///   argument (the server, not `ollama run`, a client). The address is from
///   `OLLAMA_HOST` ([`ollama_addr`]).
pub fn asker_for(info: &ProcInfo) -> Option<AskTarget> {
    let comfy = |text: &str| text.to_lowercase().contains("comfy");
    if info.argv.iter().any(|a| a.ends_with("main.py"))
        && (info.argv.iter().any(|a| comfy(a)) || comfy(&info.cwd))
    {
        return Some(AskTarget::ComfyUi(comfyui_addr(&info.argv)));
    }
    if info.exe.ends_with("/ollama") && info.argv.iter().any(|a| a == "serve") {
        return Some(AskTarget::Ollama(ollama_addr(&info.env)));
    }
    None
}

// ---------------------------------------------------------------------------
// Asking applications to free GPU memory
// ---------------------------------------------------------------------------

/// Why asking an application to free GPU memory did not work.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(
        "{app} is not listening on {addr}; start it, or check the address corral derived \
         from its command line (--listen/--port) or environment (OLLAMA_HOST)"
    )]
    NotListening { app: &'static str, addr: SocketAddr },

    #[error(
        "{app} on {addr} did not answer {request} within {timeout:?}; it may be busy \
         loading or running a model, try again later"
    )]
    Timeout {
        app: &'static str,
        addr: SocketAddr,
        request: String,
        timeout: Duration,
    },

    #[error("talking to {app} on {addr} ({request}) failed: {source}")]
    Io {
        app: &'static str,
        addr: SocketAddr,
        request: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "{app} on {addr} answered {request} with HTTP {status}{}; see {app}'s log for why",
        quote(body)
    )]
    Status {
        app: &'static str,
        addr: SocketAddr,
        request: String,
        status: u16,
        /// The first 200 bytes of the response body, lossily decoded.
        body: String,
    },

    #[error(
        "{app} on {addr} sent a malformed HTTP response to {request}: {why}; is something \
         else listening on that port?"
    )]
    BadResponse {
        app: &'static str,
        addr: SocketAddr,
        request: String,
        why: String,
    },

    #[error(
        "{app} on {addr} answered {request} with JSON corral cannot read ({source}); \
         its API may have changed"
    )]
    BadJson {
        app: &'static str,
        addr: SocketAddr,
        request: String,
        #[source]
        source: serde_json::Error,
    },
}

fn quote(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body:?}")
    }
}

/// Ask ComfyUI at `addr` to unload its models and free cached memory
/// (`POST /free`). Succeeds on any 2xx answer.
pub async fn ask_comfyui(addr: SocketAddr) -> Result<(), AskError> {
    let reply = exchange("ComfyUI", addr, "POST", "/free", Some(COMFYUI_FREE_BODY)).await?;
    debug!(%addr, status = reply.status, "ComfyUI freed its memory");
    Ok(())
}

/// Ask ollama at `addr` to unload every model it has loaded: `GET /api/ps`,
/// then `POST /api/generate` with `keep_alive: 0` for each model. Returns the
/// names of the models unloaded.
///
/// One model failing does not stop the others: failures are logged and, if
/// at least one model was unloaded, the names unloaded are returned; if every
/// model failed, the first error is returned.
pub async fn ask_ollama(addr: SocketAddr) -> Result<Vec<String>, AskError> {
    const APP: &str = "ollama";
    let reply = exchange(APP, addr, "GET", "/api/ps", None).await?;
    let ps: serde_json::Value =
        serde_json::from_slice(&reply.body).map_err(|source| AskError::BadJson {
            app: APP,
            addr,
            request: "GET /api/ps".into(),
            source,
        })?;
    let names = ollama_model_names(&ps).map_err(|why| AskError::BadResponse {
        app: APP,
        addr,
        request: "GET /api/ps".into(),
        why,
    })?;

    let mut unloaded = Vec::with_capacity(names.len());
    let mut first_error = None;
    for name in names {
        let body = serde_json::json!({ "model": name, "keep_alive": 0 }).to_string();
        match exchange(APP, addr, "POST", "/api/generate", Some(&body)).await {
            Ok(_) => unloaded.push(name),
            Err(e) => {
                // Model names and errors come from a local service: escaped.
                warn!(
                    %addr,
                    model = %esc(&name),
                    "ollama did not unload the model: {}",
                    esc(&e)
                );
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if unloaded.is_empty() => Err(e),
        _ => Ok(unloaded),
    }
}

/// The model names in an `/api/ps` answer (`name`, or `model` if a model has
/// no `name`).
fn ollama_model_names(ps: &serde_json::Value) -> Result<Vec<String>, String> {
    let models = match ps.get("models") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(models)) => models,
        Some(other) => return Err(format!("\"models\" is not a list but {other}")),
    };
    models
        .iter()
        .map(|m| {
            m.get("name")
                .or_else(|| m.get("model"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("a model has neither \"name\" nor \"model\": {m}"))
        })
        .collect()
}

/// Where ComfyUI listens, from its command line (`argv[0]` included or not):
/// `--port N` / `--port=N` (default 8188) and `--listen ADDR` /
/// `--listen=ADDR` (default 127.0.0.1). As in ComfyUI, a bare `--listen`
/// means all addresses, and ADDR may be a comma-separated list; the first
/// entry is used. An unspecified address (0.0.0.0, ::) becomes the loopback
/// address of its family. The last occurrence of a flag wins.
pub fn comfyui_addr(argv: &[String]) -> SocketAddr {
    let mut port = COMFYUI_DEFAULT_PORT;
    let mut listen: Option<String> = None;
    let mut args = argv.iter().peekable();
    while let Some(arg) = args.next() {
        if let Some(v) = arg.strip_prefix("--port=") {
            port = parse_port(v).unwrap_or(COMFYUI_DEFAULT_PORT);
        } else if arg == "--port" {
            if let Some(v) = args.next_if(|v| !v.starts_with("--")) {
                port = parse_port(v).unwrap_or(COMFYUI_DEFAULT_PORT);
            }
        } else if let Some(v) = arg.strip_prefix("--listen=") {
            listen = Some(v.to_owned());
        } else if arg == "--listen" {
            // `--listen` without a value is ComfyUI's "0.0.0.0,::".
            let v = args.next_if(|v| !v.starts_with("--"));
            listen = Some(v.map_or("0.0.0.0", String::as_str).to_owned());
        }
    }
    let ip = listen
        .as_deref()
        .and_then(|l| l.split(',').map(str::trim).find(|s| !s.is_empty()))
        .and_then(parse_ip)
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(reachable(ip), port)
}

/// Where ollama listens, from `OLLAMA_HOST` in `env`, read the way ollama
/// reads it: `HOST:PORT`, `HOST`, `:PORT`, `[V6]:PORT` or `SCHEME://...`
/// (a path is ignored). Without a port the default is 11434, or 80/443 when
/// the scheme is http/https (ollama's own rule). An unspecified or empty host
/// becomes loopback; a host name other than `localhost` cannot be resolved
/// here and becomes 127.0.0.1 with a warning.
pub fn ollama_addr(env: &BTreeMap<String, String>) -> SocketAddr {
    let default = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), OLLAMA_DEFAULT_PORT);
    let Some(raw) = env.get("OLLAMA_HOST") else {
        return default;
    };
    let raw = raw.trim().trim_matches(|c| c == '"' || c == '\'');
    if raw.is_empty() {
        return default;
    }
    let (default_port, hostport) = match raw.split_once("://") {
        None => (OLLAMA_DEFAULT_PORT, raw),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (443, rest),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (80, rest),
        Some((_, rest)) => (OLLAMA_DEFAULT_PORT, rest),
    };
    let hostport = hostport.split('/').next().unwrap_or_default();

    let (host, port) = split_host_port(hostport);
    let port = match port {
        None => default_port,
        Some(p) => parse_port(p).unwrap_or_else(|| {
            warn!("OLLAMA_HOST={raw:?} has an invalid port; using {default_port}");
            default_port
        }),
    };
    let ip = match host {
        "" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h if h.eq_ignore_ascii_case("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h => parse_ip(h).unwrap_or_else(|| {
            warn!(
                "OLLAMA_HOST={raw:?} names a host corral does not resolve; asking 127.0.0.1:{port}"
            );
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        }),
    };
    SocketAddr::new(reachable(ip), port)
}

/// `host:port`, `[v6]:port`, `[v6]`, a bare v6 address or a bare host.
fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => (rest, None),
        };
    }
    match s.rsplit_once(':') {
        // More than one colon without brackets: a bare IPv6 address.
        Some((host, _)) if host.contains(':') => (s, None),
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.trim().parse().ok()
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// An address a local client can connect to: listening on "any" means
/// loopback is served too.
fn reachable(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// A parsed HTTP response.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    status: u16,
    body: Vec<u8>,
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), bounded
/// by [`ASK_TIMEOUT`] as a whole. Any status outside 2xx is an error;
/// redirects are not followed.
async fn exchange(
    app: &'static str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> Result<Reply, AskError> {
    let request = format!("{method} {path}");
    let io_err = |source: io::Error| AskError::Io {
        app,
        addr,
        request: request.clone(),
        source,
    };

    let talk = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| {
            if e.kind() == ErrorKind::ConnectionRefused {
                AskError::NotListening { app, addr }
            } else {
                io_err(e)
            }
        })?;

        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: corral/{}\r\n\
             Accept: application/json\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION")
        );
        let body = json_body.unwrap_or_default();
        if json_body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if json_body.is_some() || method != "GET" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut message = head.into_bytes();
        message.extend_from_slice(body.as_bytes());
        stream.write_all(&message).await.map_err(io_err)?;
        stream.flush().await.map_err(io_err)?;

        let mut raw = Vec::with_capacity(1024);
        let mut chunk = [0u8; 8192];
        loop {
            let n = stream.read(&mut chunk).await.map_err(io_err)?;
            raw.extend_from_slice(&chunk[..n]);
            let bad = |why: String| AskError::BadResponse {
                app,
                addr,
                request: request.clone(),
                why,
            };
            if let Some(reply) = parse_response(&raw, n == 0).map_err(bad)? {
                return Ok(reply);
            }
            if raw.len() > MAX_RESPONSE_BYTES {
                return Err(bad(format!(
                    "response larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
        }
    };
    let reply = match tokio::time::timeout(ASK_TIMEOUT, talk).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(AskError::Timeout {
                app,
                addr,
                request,
                timeout: ASK_TIMEOUT,
            });
        }
    };
    if !(200..300).contains(&reply.status) {
        let quoted = &reply.body[..reply.body.len().min(QUOTED_BODY_BYTES)];
        return Err(AskError::Status {
            app,
            addr,
            request,
            status: reply.status,
            body: String::from_utf8_lossy(quoted).trim().to_owned(),
        });
    }
    Ok(reply)
}

/// Parse a complete response out of `raw`, or `Ok(None)` if more bytes are
/// needed. `eof` says the peer closed the connection, which ends a body that
/// has neither `Content-Length` nor chunked encoding.
fn parse_response(raw: &[u8], eof: bool) -> Result<Option<Reply>, String> {
    let mut rest = raw;
    loop {
        let Some(end) = find(rest, b"\r\n\r\n") else {
            return if eof {
                Err(if rest.is_empty() {
                    "the connection closed without a response".into()
                } else {
                    "the connection closed in the middle of the headers".into()
                })
            } else {
                Ok(None)
            };
        };
        let head = std::str::from_utf8(&rest[..end]).map_err(|_| "headers are not UTF-8")?;
        let body = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = parse_status_line(status_line)?;
        if (100..200).contains(&status) {
            // An interim response (100 Continue); the real one follows.
            rest = body;
            continue;
        }

        let mut content_length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                return Err(format!("header line {line:?} has no colon"));
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                let n: usize = value
                    .parse()
                    .map_err(|_| format!("Content-Length {value:?} is not a number"))?;
                content_length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            }
        }

        if chunked {
            return match dechunk(body)? {
                Some(body) => Ok(Some(Reply { status, body })),
                None if eof => Err("the connection closed inside a chunked body".into()),
                None => Ok(None),
            };
        }
        if let Some(len) = content_length {
            return if body.len() >= len {
                Ok(Some(Reply {
                    status,
                    body: body[..len].to_vec(),
                }))
            } else if eof {
                Err(format!(
                    "the connection closed after {} of {len} body bytes",
                    body.len()
                ))
            } else {
                Ok(None)
            };
        }
        if status == 204 || status == 304 {
            return Ok(Some(Reply {
                status,
                body: Vec::new(),
            }));
        }
        return Ok(eof.then(|| Reply {
            status,
            body: body.to_vec(),
        }));
    }
}

/// `HTTP/1.x NNN reason` → NNN.
fn parse_status_line(line: &str) -> Result<u16, String> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!("status line {line:?} is not HTTP/1.x"));
    }
    code.parse()
        .map_err(|_| format!("status line {line:?} has no numeric status"))
}

/// Decode a chunked body; `Ok(None)` if it is not complete yet. Trailers
/// are ignored.
fn dechunk(mut raw: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(raw, b"\r\n") else {
            return Ok(None);
        };
        let size_line = std::str::from_utf8(&raw[..eol]).map_err(|_| "chunk size is not UTF-8")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("chunk size {size_line:?} is not hexadecimal"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if size > MAX_RESPONSE_BYTES {
            return Err(format!("a chunk of {size} bytes is too large"));
        }
        if raw.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&raw[..size]);
        if &raw[size..size + 2] != b"\r\n" {
            return Err("a chunk does not end in CRLF".into());
        }
        raw = &raw[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn env(host: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("OLLAMA_HOST".to_owned(), host.to_owned())])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proc(exe: &str, args: &str, cwd: &str) -> ProcInfo {
        ProcInfo {
            exe: exe.to_owned(),
            argv: argv(args),
            cwd: cwd.to_owned(),
            ..ProcInfo::default()
        }
    }

    #[test]
    fn asker_for_finds_comfyui_by_main_py_and_comfy_in_argv_or_cwd() {
        let python = "/usr/bin/python3.12";
        // `python main.py` inside a checkout: the cwd says ComfyUI.
        assert_eq!(
            asker_for(&proc(
                python,
                "python main.py --port 8190",
                "/home/u/src/ComfyUI"
            )),
            Some(AskTarget::ComfyUi(addr("127.0.0.1:8190")))
        );
        // Started from elsewhere: the script's path says it.
        assert_eq!(
            asker_for(&proc(
                python,
                "python /opt/comfyui/main.py --listen 0.0.0.0",
                "/"
            )),
            Some(AskTarget::ComfyUi(addr("127.0.0.1:8188")))
        );
        // Another program's main.py, or ComfyUI's other scripts: no.
        assert_eq!(
            asker_for(&proc(python, "python main.py", "/home/u/src/flask-app")),
            None
        );
        assert_eq!(
            asker_for(&proc(
                python,
                "python /home/u/ComfyUI/custom_nodes/install.py",
                "/home/u/ComfyUI"
            )),
            None
        );
    }

    #[test]
    fn asker_for_finds_the_ollama_server_not_its_clients() {
        let mut server = proc("/usr/local/bin/ollama", "/usr/local/bin/ollama serve", "/");
        assert_eq!(
            asker_for(&server),
            Some(AskTarget::Ollama(addr("127.0.0.1:11434")))
        );
        server.env = env("0.0.0.0:11500");
        let target = asker_for(&server).unwrap();
        assert_eq!(target, AskTarget::Ollama(addr("127.0.0.1:11500")));
        assert_eq!(target.to_string(), "ollama on 127.0.0.1:11500");
        assert_eq!(target.app(), "ollama");
        assert_eq!(
            asker_for(&proc("/usr/local/bin/ollama", "ollama run llama3", "/")),
            None
        );
        // `serve` alone is not enough: the executable must be ollama.
        assert_eq!(
            asker_for(&proc(
                "/usr/bin/python3",
                "python -m http.server serve",
                "/"
            )),
            None
        );
        assert_eq!(asker_for(&ProcInfo::default()), None);
    }

    #[test]
    fn comfyui_defaults() {
        assert_eq!(comfyui_addr(&[]), addr("127.0.0.1:8188"));
        assert_eq!(
            comfyui_addr(&argv("python main.py")),
            addr("127.0.0.1:8188")
        );
    }

    #[test]
    fn comfyui_port_forms() {
        assert_eq!(
            comfyui_addr(&argv("python main.py --port 8190")),
            addr("127.0.0.1:8190")
        );
        assert_eq!(
            comfyui_addr(&argv("python main.py --port=8191")),
            addr("127.0.0.1:8191")
        );
        // Last one wins, as with argparse.
        assert_eq!(
            comfyui_addr(&argv("main.py --port 8190 --port=8192")),
            addr("127.0.0.1:8192")
        );
        // Garbage falls back to the default.
        assert_eq!(
            comfyui_addr(&argv("main.py --port nope")),
            addr("127.0.0.1:8188")
        );
        assert_eq!(
            comfyui_addr(&argv("main.py --port")),
            addr("127.0.0.1:8188")
        );
    }

    #[test]
    fn comfyui_listen_forms() {
        assert_eq!(
            comfyui_addr(&argv("main.py --listen 0.0.0.0 --port 8190")),
            addr("127.0.0.1:8190")
        );
        assert_eq!(
            comfyui_addr(&argv("main.py --listen=::")),
            addr("[::1]:8188")
        );
        assert_eq!(
            comfyui_addr(&argv("main.py --listen 192.168.1.5")),
            addr("192.168.1.5:8188")
        );
        assert_eq!(
            comfyui_addr(&argv("main.py --listen ::1 --port 9000")),
            addr("[::1]:9000")
        );
        // A bare --listen means all addresses.
        assert_eq!(
            comfyui_addr(&argv("main.py --listen --port 8190")),
            addr("127.0.0.1:8190")
        );
        assert_eq!(
            comfyui_addr(&argv("main.py --listen")),
            addr("127.0.0.1:8188")
        );
        // Comma-separated list: first entry.
        assert_eq!(
            comfyui_addr(&argv("main.py --listen 0.0.0.0,::")),
            addr("127.0.0.1:8188")
        );
        assert_eq!(
            comfyui_addr(&argv("main.py --listen=::,0.0.0.0")),
            addr("[::1]:8188")
        );
        // A host name is not resolved.
        assert_eq!(
            comfyui_addr(&argv("main.py --listen myhost")),
            addr("127.0.0.1:8188")
        );
    }

    #[test]
    fn ollama_defaults() {
        assert_eq!(ollama_addr(&BTreeMap::new()), addr("127.0.0.1:11434"));
        assert_eq!(ollama_addr(&env("")), addr("127.0.0.1:11434"));
        assert_eq!(ollama_addr(&env("  ")), addr("127.0.0.1:11434"));
    }

    #[test]
    fn ollama_host_forms() {
        assert_eq!(
            ollama_addr(&env("127.0.0.1:11434")),
            addr("127.0.0.1:11434")
        );
        assert_eq!(ollama_addr(&env("0.0.0.0")), addr("127.0.0.1:11434"));
        assert_eq!(ollama_addr(&env("0.0.0.0:12000")), addr("127.0.0.1:12000"));
        assert_eq!(
            ollama_addr(&env("http://127.0.0.1:11500")),
            addr("127.0.0.1:11500")
        );
        assert_eq!(
            ollama_addr(&env("http://localhost:11500/")),
            addr("127.0.0.1:11500")
        );
        assert_eq!(ollama_addr(&env(":11435")), addr("127.0.0.1:11435"));
        assert_eq!(ollama_addr(&env("localhost")), addr("127.0.0.1:11434"));
        assert_eq!(
            ollama_addr(&env("\"10.0.0.2:5000\"")),
            addr("10.0.0.2:5000")
        );
    }

    #[test]
    fn ollama_host_ipv6_and_schemes() {
        assert_eq!(ollama_addr(&env("[::]:11434")), addr("[::1]:11434"));
        assert_eq!(ollama_addr(&env("::")), addr("[::1]:11434"));
        assert_eq!(ollama_addr(&env("[::1]")), addr("[::1]:11434"));
        assert_eq!(ollama_addr(&env("http://[::1]:8080/x")), addr("[::1]:8080"));
        // ollama's own rule: a scheme without a port means the scheme's port.
        assert_eq!(ollama_addr(&env("http://127.0.0.1")), addr("127.0.0.1:80"));
        assert_eq!(
            ollama_addr(&env("https://127.0.0.1")),
            addr("127.0.0.1:443")
        );
        // A bad port falls back to the default.
        assert_eq!(
            ollama_addr(&env("127.0.0.1:99999")),
            addr("127.0.0.1:11434")
        );
    }

    #[test]
    fn parses_content_length_response() {
        let raw =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            parse_response(raw, false).unwrap(),
            Some(Reply {
                status: 200,
                body: b"{}".to_vec()
            })
        );
        // Incomplete body: wait for more, or fail at EOF.
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}";
        assert_eq!(parse_response(short, false).unwrap(), None);
        assert!(parse_response(short, true).is_err());
    }

    #[test]
    fn parses_chunked_and_eof_delimited_responses() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked, false).unwrap().unwrap().body,
            b"{\"a\":1}".to_vec()
        );
        assert_eq!(parse_response(&chunked[..60], false).unwrap(), None);

        let until_eof = b"HTTP/1.0 500 Internal Server Error\r\n\r\noops";
        assert_eq!(parse_response(until_eof, false).unwrap(), None);
        assert_eq!(
            parse_response(until_eof, true).unwrap(),
            Some(Reply {
                status: 500,
                body: b"oops".to_vec()
            })
        );
    }

    #[test]
    fn skips_interim_responses_and_rejects_garbage() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse_response(raw, false).unwrap().unwrap().status, 204);
        assert!(parse_response(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", false).is_err());
        assert!(parse_response(b"", true).is_err());
    }

    #[test]
    fn model_names_from_ps() {
        let ps = serde_json::json!({"models": [{"name": "a:1", "model": "a:1"}, {"model": "b"}]});
        assert_eq!(ollama_model_names(&ps).unwrap(), ["a:1", "b"]);
        assert!(
            ollama_model_names(&serde_json::json!({}))
                .unwrap()
                .is_empty()
        );
        assert!(
            ollama_model_names(&serde_json::json!({"models": null}))
                .unwrap()
                .is_empty()
        );
        assert!(ollama_model_names(&serde_json::json!({"models": 3})).is_err());
        assert!(ollama_model_names(&serde_json::json!({"models": [{}]})).is_err());
    }
}
