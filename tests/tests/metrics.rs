//! The Prometheus endpoint of a live agent: it parses (with a parser, not
//! string search), its counters only go up across scrapes, run-queue
//! latency shows for a contended class, and every metric the shipped
//! Grafana dashboard queries is one the agent exports.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use corral_tests::{Agent, busy_loops_on_cpu0, named_shell, repo_root, wait_for};

const POLICY: &str = r#"
[classes.game]
cpus = "0"

[classes.dev]
cpus = "0"

[telemetry]
enabled = true
metrics_addr = "127.0.0.1:0"

[[rules]]
name = "busy"
class = "game"
exe = ["*/cme-busy"]
"#;

fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).unwrap()
}

/// (series name + sorted labels) -> value, for counters and histogram parts.
fn monotonic_series(scrape: &prometheus_parse::Scrape) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for sample in &scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let key = format!("{}{{{}}}", sample.metric, labels.join(","));
        match &sample.value {
            prometheus_parse::Value::Counter(v) => out.push((key, *v)),
            prometheus_parse::Value::Histogram(buckets) => {
                for b in buckets {
                    out.push((format!("{key}le={}", b.less_than), b.count));
                }
            }
            prometheus_parse::Value::Untyped(v) if sample.metric.ends_with("_count") => {
                out.push((key, *v))
            }
            _ => {}
        }
    }
    out
}

#[test]
fn live_scrape_parses_counters_only_grow_and_dashboard_metrics_exist() {
    let agent = Agent::start("metrics", POLICY).unwrap();
    let addr = agent
        .status()
        .unwrap()
        .metrics_addr
        .expect("metrics endpoint");
    let busy = named_shell(&agent.dir, "cme-busy");
    let _children = busy_loops_on_cpu0(&busy, 2);
    // The endpoint refreshes every second.
    let runq_count = |s: &prometheus_parse::Scrape| {
        s.samples
            .iter()
            .find(|x| {
                x.metric == "corral_class_runqueue_latency_seconds"
                    && x.labels.get("class") == Some("game")
            })
            .and_then(|x| match &x.value {
                prometheus_parse::Value::Histogram(b) => b.last().map(|b| b.count),
                _ => None,
            })
            .unwrap_or(0.0)
    };
    assert!(
        wait_for(Duration::from_secs(10), || runq_count(&scrape(&addr)) > 0.0),
        "no run-queue samples for game"
    );
    let first = scrape(&addr);
    std::thread::sleep(Duration::from_millis(2200));
    let second = scrape(&addr);
    let before = monotonic_series(&first);
    let after: std::collections::HashMap<_, _> = monotonic_series(&second).into_iter().collect();
    assert!(before.len() > 20, "too few counter series: {before:?}");
    let mut grew = 0;
    for (key, value) in &before {
        let now = after
            .get(key)
            .unwrap_or_else(|| panic!("{key} vanished between scrapes"));
        assert!(now >= value, "{key} went down: {value} -> {now}");
        grew += usize::from(now > value);
    }
    assert!(grew > 0, "nothing grew in 2 s of two busy loops");
    let families: std::collections::BTreeSet<&str> =
        second.samples.iter().map(|s| s.metric.as_str()).collect();
    for name in [
        "corral_class_cpu_seconds_total",
        "corral_events_total",
        "corral_agent_resident_memory_bytes",
        "corral_mode",
    ] {
        assert!(families.contains(name), "{name} missing from {families:?}");
    }

    // The shipped dashboard queries only metrics the agent exports, and
    // every one that needs no GPU is in this live scrape.
    let dashboard =
        std::fs::read_to_string(repo_root().join("contrib/grafana/corral.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            queried.extend(metric_names(expr));
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    let live: std::collections::BTreeSet<String> = second
        .samples
        .iter()
        .map(|s| s.metric.clone())
        .chain(second.docs.keys().cloned())
        .collect();
    for name in &queried {
        assert!(
            corral::observe::metrics::Metrics::exports(name),
            "dashboard queries {name}, which the agent never exports"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
        let needs_gpu = family.starts_with("corral_gpu_") || family.contains("_vram_");
        if !needs_gpu {
            assert!(
                live.contains(family),
                "dashboard queries {name}, missing from the live scrape"
            );
        }
    }
}

/// `corral_...` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("corral_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Guards the wake-up path: records that woke no one would be read only at
/// the once-a-second drain, and most of ten execs would wait longer than
/// 100 ms. With the proc connector (the default) and with the BPF
/// programs' own wake-ups (`--no-proc-connector`), every one is placed at
/// once.
#[test]
fn every_exec_is_placed_within_100ms_whichever_wakes_the_agent() {
    for args in [&[][..], &["--no-proc-connector"][..]] {
        let agent = Agent::builder("wake", POLICY).args(args).start().unwrap();
        let addr = agent
            .status()
            .unwrap()
            .metrics_addr
            .expect("metrics endpoint");
        let busy = corral_tests::named_copy(&agent.dir, "sleep", "cme-busy").unwrap();
        let mut children = Vec::new();
        for _ in 0..10 {
            children.push(std::process::Command::new(&busy).arg("5").spawn().unwrap());
            std::thread::sleep(Duration::from_millis(150));
        }
        let latency = |scrape: &prometheus_parse::Scrape| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == "corral_placement_latency_seconds")
                .and_then(|s| match &s.value {
                    prometheus_parse::Value::Histogram(buckets) => Some(buckets.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        let placed = wait_for(Duration::from_secs(5), || {
            latency(&scrape(&addr))
                .last()
                .is_some_and(|b| b.count >= 10.0)
        });
        let buckets = latency(&scrape(&addr));
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            placed,
            "{args:?}: not all 10 placed: {buckets:?}\n{}",
            agent.log()
        );
        let within = buckets.iter().find(|b| b.less_than == 0.1).map(|b| b.count);
        let all = buckets.last().map(|b| b.count);
        assert_eq!(
            within, all,
            "{args:?}: placements slower than 100 ms: {buckets:?}"
        );
    }
}
