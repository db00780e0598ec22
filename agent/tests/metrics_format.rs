//! `corral::observe::metrics` as Prometheus sees it: a fully populated `Metrics`
//! rendered and read back by a real text-format parser (prometheus-parse),
//! then served over TCP and scraped twice with plain HTTP/1.1 requests.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use corral::{
    model::modes::Mode,
    observe::metrics::{self, ClassMetrics, GpuMetrics, Histogram, LOG2_US_BUCKETS, Metrics},
};
use prometheus_parse::{Sample, Scrape, Value};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

/// Families written as histograms; every other family is a counter when its
/// name ends in `_total` and a gauge otherwise.
const HISTOGRAMS: [&str; 2] = [
    "corral_class_runqueue_latency_seconds",
    "corral_placement_latency_seconds",
];

/// Every field set, every Option `Some`, two classes and two GPUs.
fn populated() -> Metrics {
    let mut m = Metrics::default();
    for (i, class) in ["game", "dev"].into_iter().enumerate() {
        let n = i as u64 + 1;
        let mut raw = vec![0u64; LOG2_US_BUCKETS];
        raw[2] = 10 * n;
        raw[5] = 4 * n;
        raw[12] = n;
        let mut c = ClassMetrics {
            processes: 3 * n,
            cpu_seconds: 12.25 * n as f64,
            runqueue_latency: Histogram::from_log2_us(&raw),
            placements: 7 * n,
            vram_used_bytes: Some(n << 30),
            vram_budget_bytes: Some(8 << 30),
            cpus: 4 * n,
            ..ClassMetrics::default()
        };
        c.set_cpu_pressure(
            "some avg10=1.50 avg60=0.80 avg300=0.20 total=2500000\nfull avg10=0.25 avg60=0.10 avg300=0.00 total=1000\n",
        );
        m.classes.insert(class.to_string(), c);
    }
    for s in [0.00003, 0.0002, 0.0007, 0.004, 0.2] {
        m.placement_latency.observe(s);
    }
    m.events.exec = 100;
    m.events.fork = 250;
    m.events.exit = 240;
    m.events_dropped_total = 2;
    m.events_vanished_total = 5;
    m.move_errors_total = 1;
    m.policy_reloads.ok = 3;
    m.policy_reloads.refused = 1;
    for index in 0..2 {
        m.gpus.push(GpuMetrics {
            index,
            name: "NVIDIA GeForce RTX 4090".to_string(),
            utilization_ratio: Some(0.42),
            temperature_celsius: Some(63.0),
            power_watts: Some(210.5),
            memory_used_bytes: Some(3 << 30),
            memory_total_bytes: Some(24 << 30),
        });
    }
    let (rss, cpu) = metrics::read_self();
    m.agent_resident_memory_bytes = rss;
    m.agent_cpu_seconds_total = cpu;
    m.mode = Mode::Protected;
    m.power_held = Some("sysfs".to_string());
    m.coexisting = vec!["sched_ext (lavd_1.0)".to_string(), "gamemoded".to_string()];
    m
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("the text format parses")
}

/// `metric{sorted labels}`, to match a sample across scrapes.
fn key(s: &Sample) -> String {
    format!("{}{{{}}}", s.metric, s.labels)
}

/// A plain sample's value (counter, gauge, or a histogram's `_sum`/`_count`,
/// which the parser leaves untyped).
fn scalar(s: &Sample) -> Option<f64> {
    match s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
        _ => None,
    }
}

/// Checks the parsed text: every family present with its HELP and type, no
/// stray series, histograms cumulative and consistent with `_count`.
fn check_scrape(scrape: &Scrape) {
    let names = Metrics::names();
    for name in &names {
        assert!(scrape.docs.contains_key(*name), "no # HELP for {name}");
        let samples: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == *name)
            .collect();
        assert!(!samples.is_empty(), "no sample of {name}");
        for s in samples {
            let ok = if HISTOGRAMS.contains(name) {
                matches!(s.value, Value::Histogram(_))
            } else if name.ends_with("_total") {
                matches!(s.value, Value::Counter(_))
            } else {
                matches!(s.value, Value::Gauge(_))
            };
            assert!(ok, "{name} has the wrong type: {:?}", s.value);
        }
    }
    for s in &scrape.samples {
        assert!(
            Metrics::exports(&s.metric),
            "{} is not in Metrics::names()",
            s.metric
        );
        if let Some(v) = scalar(s) {
            assert!(v.is_finite() && v >= 0.0, "{} = {v}", key(s));
        }
    }

    for s in &scrape.samples {
        let Value::Histogram(buckets) = &s.value else {
            continue;
        };
        assert!(buckets.len() >= 2, "{}: too few buckets", key(s));
        for pair in buckets.windows(2) {
            assert!(
                pair[0].less_than < pair[1].less_than,
                "{}: le not ascending: {pair:?}",
                key(s)
            );
            assert!(
                pair[0].count <= pair[1].count,
                "{}: buckets not cumulative: {pair:?}",
                key(s)
            );
        }
        let last = buckets.last().unwrap();
        assert_eq!(last.less_than, f64::INFINITY, "{}: no +Inf bucket", key(s));
        let count = scrape
            .samples
            .iter()
            .find(|c| c.metric == format!("{}_count", s.metric) && c.labels == s.labels)
            .and_then(scalar)
            .unwrap_or_else(|| panic!("{}: no _count", key(s)));
        assert_eq!(last.count, count, "{}: +Inf bucket != _count", key(s));
        assert!(
            scrape
                .samples
                .iter()
                .any(|c| c.metric == format!("{}_sum", s.metric) && c.labels == s.labels),
            "{}: no _sum",
            key(s)
        );
    }
}

fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(scalar)
        .unwrap_or_else(|| panic!("no {metric} {labels:?}"))
}

#[test]
fn populated_metrics_parse_with_every_family_and_type() {
    let m = populated();
    let scrape = parse(&m.render());
    check_scrape(&scrape);

    assert_eq!(
        value(&scrape, "corral_class_processes", &[("class", "dev")]),
        6.0
    );
    assert_eq!(
        value(
            &scrape,
            "corral_class_cpu_seconds_total",
            &[("class", "game")]
        ),
        12.25
    );
    assert_eq!(
        value(
            &scrape,
            "corral_class_cpu_pressure_some_avg10_ratio",
            &[("class", "game")]
        ),
        0.015
    );
    assert_eq!(
        value(
            &scrape,
            "corral_class_cpu_pressure_some_seconds_total",
            &[("class", "game")]
        ),
        2.5
    );
    assert_eq!(
        value(&scrape, "corral_events_total", &[("kind", "fork")]),
        250.0
    );
    assert_eq!(
        value(
            &scrape,
            "corral_policy_reloads_total",
            &[("result", "refused")]
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, "corral_gpu_power_watts", &[("gpu", "1")]),
        210.5
    );
    assert_eq!(
        value(
            &scrape,
            "corral_gpu_memory_total_bytes",
            &[("gpu", "0"), ("name", "NVIDIA GeForce RTX 4090")]
        ),
        (24u64 << 30) as f64
    );
    assert_eq!(value(&scrape, "corral_mode", &[("mode", "protected")]), 1.0);
    assert_eq!(value(&scrape, "corral_mode", &[("mode", "shared")]), 0.0);
    assert_eq!(
        value(&scrape, "corral_power_held", &[("method", "sysfs")]),
        1.0
    );
    assert_eq!(
        value(&scrape, "corral_power_held", &[("method", "ppd")]),
        0.0
    );
    assert_eq!(
        value(&scrape, "corral_coexisting_tool", &[("tool", "gamemoded")]),
        1.0
    );
    assert!(value(&scrape, "corral_agent_resident_memory_bytes", &[]) > 0.0);

    // The placement histogram: 5 samples, one past 100 ms, le in seconds.
    let placement = scrape
        .samples
        .iter()
        .find(|s| s.metric == "corral_placement_latency_seconds")
        .unwrap();
    let Value::Histogram(buckets) = &placement.value else {
        unreachable!()
    };
    let les: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
    assert_eq!(
        les,
        [
            0.00005,
            0.0001,
            0.00025,
            0.0005,
            0.001,
            0.0025,
            0.005,
            0.01,
            0.025,
            0.1,
            f64::INFINITY
        ]
    );
    let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
    assert_eq!(
        counts,
        [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 4.0, 4.0, 5.0]
    );

    // Runqueue latency: 26 log2 buckets plus +Inf, le = 2^(i+1) µs.
    let game = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "corral_class_runqueue_latency_seconds"
                && s.labels.get("class") == Some("game")
        })
        .unwrap();
    let Value::Histogram(buckets) = &game.value else {
        unreachable!()
    };
    assert_eq!(buckets.len(), LOG2_US_BUCKETS + 1);
    assert_eq!(buckets[2].less_than, 0.000008);
    assert_eq!(buckets[2].count, 10.0);
    assert_eq!(buckets[LOG2_US_BUCKETS].count, 15.0);
    assert_eq!(
        m.classes["game"].runqueue_latency.percentile(0.5),
        Some(0.000008)
    );
    assert_eq!(
        m.classes["game"].runqueue_latency.percentile(0.99),
        Some(0.008192)
    );
}

/// A whole HTTP/1.1 exchange: (status code, headers lowercased, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, BTreeMap<String, String>, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: metrics_format\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read answer");
        raw
    };
    let raw = timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the server answers in time");
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let status = lines.next().unwrap();
    assert!(status.starts_with("HTTP/1.1 "), "{status}");
    let code = status[9..12].parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert_eq!(
        headers.get("content-length").map(String::as_str),
        Some(body.len().to_string().as_str())
    );
    (code, headers, body.to_string())
}

#[tokio::test]
async fn served_metrics_scrape_and_only_count_up() {
    let shared = Arc::new(Mutex::new(populated()));
    let state = Arc::clone(&shared);
    let (addr, server) = metrics::serve("127.0.0.1:0".parse().unwrap(), move || {
        std::future::ready(Some(state.lock().unwrap().render()))
    })
    .await
    .expect("bind on a free loopback port");
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);

    // A client that connects and never sends must not hold the server up.
    let mut idle = TcpStream::connect(addr).await.unwrap();

    let (code, headers, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        headers["content-type"].starts_with("text/plain; version=0.0.4"),
        "{}",
        headers["content-type"]
    );
    let first = parse(&body);
    check_scrape(&first);

    let (code, _, _) = get(addr, "/other").await;
    assert_eq!(code, 404);
    let (code, _, _) = get(addr, "/metricsx").await;
    assert_eq!(code, 404);

    // An oversized request head (16 KiB, never finished) gets a 431 (the
    // server drains what it did not read before closing, so the answer is
    // not lost to a reset), and the server goes on serving.
    let mut big = TcpStream::connect(addr).await.unwrap();
    let pad = format!("GET /metrics HTTP/1.1\r\nX-Pad: {}", "a".repeat(16 * 1024));
    big.write_all(pad.as_bytes()).await.expect("send 16 KiB");
    let mut answer = Vec::new();
    timeout(Duration::from_secs(10), big.read_to_end(&mut answer))
        .await
        .expect("an oversized request is answered in time")
        .expect("read the 431");
    assert!(
        answer.starts_with(b"HTTP/1.1 431 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    {
        let mut m = shared.lock().unwrap();
        m.events.exec += 5;
        m.events.exit += 1;
        m.placement_latency.observe(0.0004);
        let game = m.classes.get_mut("game").unwrap();
        game.cpu_seconds += 1.5;
        game.placements += 1;
        let mut raw = vec![0u64; LOG2_US_BUCKETS];
        raw[2] = 11;
        raw[5] = 4;
        raw[12] = 2;
        game.runqueue_latency = Histogram::from_log2_us(&raw);
        let (rss, cpu) = metrics::read_self();
        m.agent_resident_memory_bytes = rss;
        m.agent_cpu_seconds_total = cpu;
    }
    let (code, _, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let second = parse(&body);
    check_scrape(&second);

    let counters = |scrape: &Scrape| -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in &scrape.samples {
            match &s.value {
                Value::Counter(v) => {
                    out.insert(key(s), *v);
                }
                Value::Histogram(buckets) => {
                    for b in buckets {
                        out.insert(format!("{} le={}", key(s), b.less_than), b.count);
                    }
                }
                // A histogram's _count only grows too.
                Value::Untyped(v) if s.metric.ends_with("_count") => {
                    out.insert(key(s), *v);
                }
                _ => {}
            }
        }
        out
    };
    let (before, after) = (counters(&first), counters(&second));
    assert!(before.len() > 20, "too few counters: {before:?}");
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (k, v) in &before {
        assert!(after[k] >= *v, "{k} went down: {v} -> {}", after[k]);
    }
    let grew: Vec<_> = before
        .iter()
        .filter(|(k, v)| after[*k] > **v)
        .map(|(k, _)| k.as_str())
        .collect();
    for expected in [
        "corral_events_total{kind=\"exec\"}",
        "corral_events_total{kind=\"exit\"}",
        "corral_class_cpu_seconds_total{class=\"game\"}",
        "corral_class_placements_total{class=\"game\"}",
        "corral_placement_latency_seconds_count{}",
        "corral_class_runqueue_latency_seconds_count{class=\"game\"}",
    ] {
        assert!(
            grew.contains(&expected),
            "{expected} did not grow; grew: {grew:?}"
        );
    }
    assert!(!grew.contains(&"corral_events_total{kind=\"fork\"}"));

    // The idle client finally sends: it is answered, unless it took longer
    // than the server's 5 s request timeout (then it was dropped, which is
    // fine too). Either way it held nothing up.
    let _ = idle.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
    let mut late = Vec::new();
    let _ = timeout(Duration::from_secs(10), idle.read_to_end(&mut late))
        .await
        .expect("the idle client is answered or closed in time");
    assert!(late.is_empty() || late.starts_with(b"HTTP/1.1 200 OK\r\n"));

    server.abort();
}

#[tokio::test]
async fn each_scrape_renders_afresh_and_a_gone_renderer_answers_503() {
    let renders = Arc::new(Mutex::new(0u32));
    let counted = Arc::clone(&renders);
    let (addr, server) = metrics::serve("127.0.0.1:0".parse().unwrap(), move || {
        let counted = Arc::clone(&counted);
        async move {
            let mut n = counted.lock().unwrap();
            *n += 1;
            // The third scrape finds the loop gone.
            (*n < 3).then(|| format!("corral_scrapes {n}\n"))
        }
    })
    .await
    .expect("bind on a free loopback port");
    assert_eq!(
        *renders.lock().unwrap(),
        0,
        "nothing rendered before a scrape"
    );
    let (code, _, body) = get(addr, "/metrics").await;
    assert_eq!((code, body.as_str()), (200, "corral_scrapes 1\n"));
    let (code, _, body) = get(addr, "/metrics").await;
    assert_eq!((code, body.as_str()), (200, "corral_scrapes 2\n"));
    let (code, _, _) = get(addr, "/nothing").await;
    assert_eq!(code, 404);
    assert_eq!(*renders.lock().unwrap(), 2, "a 404 renders nothing");
    let (code, _, body) = get(addr, "/metrics").await;
    assert_eq!(code, 503);
    assert!(body.contains("stopping"), "{body}");
    server.abort();
}
