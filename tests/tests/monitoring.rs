//! The monitoring assets (README "Monitoring"): the Prometheus alert rules and the Grafana
//! dashboard in `sip-dispatch/dist/` refer only to metrics (and label values) that a live
//! daemon exports, and the dashboard's queries are PromQL that `promtool` accepts.
//!
//! The live check scrapes a real daemon (native XDP, SIPp backends, in the test bed's
//! namespaces) and compares every `sip_dispatch_*` name used in the dashboard's
//! expressions and in the rules with the page. `promtool check rules` and `promtool test
//! rules` on the rules themselves run as their own `cargo xtask test` step.
//!
//! Needs root, SIPp, promtool (Debian `prometheus`) and the sip-dispatch binary
//! (`$SIP_DISPATCH_BIN`, else `target/debug/sip-dispatch`): without them the tests fail,
//! they never skip. Run with `--test-threads=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use sip_dispatch_testbed::bed::{Bed, text, wait_list};

const PREFIX: &str = "sip_dispatch_";

fn workdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sip-dispatch-monitoring")
}

fn dist(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sip-dispatch/dist")
        .join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A metric used in an expression, with the label values it selects on by equality (or a
/// regex that is a plain `a|b|c` list): each must exist on the page.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Use {
    name: String,
    labels: Vec<(String, String)>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `sip_dispatch_*` metric in `expr`, with its plain label matchers. Labels the
/// scraper adds (`job`, `instance`) and values with a dashboard variable are not checked.
fn uses(expr: &str) -> Vec<Use> {
    let mut out = Vec::new();
    let mut rest = expr;
    let mut before: Option<char> = None;
    while let Some(at) = rest.find(PREFIX) {
        let prev = rest[..at].chars().next_back().or(before);
        let tail = &rest[at..];
        let len = tail.find(|c| !is_name_char(c)).unwrap_or(tail.len());
        let (name, after) = tail.split_at(len);
        before = name.chars().next_back();
        rest = after;
        if prev.is_some_and(is_name_char) {
            continue;
        }
        let mut labels = Vec::new();
        if let Some(body) = after.strip_prefix('{')
            && let Some(end) = body.find('}')
        {
            for (label, op, value) in matchers(&body[..end]) {
                let checked = !["job", "instance"].contains(&label.as_str())
                    && !value.contains('$')
                    && match op.as_str() {
                        "=" => true,
                        "=~" => value.chars().all(|c| is_name_char(c) || c == '|'),
                        _ => false,
                    };
                if checked {
                    for v in value.split('|') {
                        labels.push((label.clone(), v.to_owned()));
                    }
                }
            }
        }
        out.push(Use {
            name: name.to_owned(),
            labels,
        });
    }
    out
}

/// `a="x", b=~"y|z"` as (label, operator, value).
fn matchers(body: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let Some(q) = rest.find('"') else { break };
        let head = rest[..q].trim().trim_start_matches(',').trim();
        let op_at = head.find(['=', '!']).unwrap_or(head.len());
        let (label, op) = head.split_at(op_at);
        let Some(close) = rest[q + 1..].find('"') else {
            break;
        };
        let value = &rest[q + 1..q + 1 + close];
        out.push((
            label.trim().to_owned(),
            op.trim().to_owned(),
            value.to_owned(),
        ));
        rest = rest[q + 2 + close..].trim();
    }
    out
}

/// A scraped page: sample names with their labels, and the `# TYPE` of each family.
struct Page {
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
    types: BTreeMap<String, String>,
}

impl Page {
    fn parse(page: &str) -> Page {
        let mut samples: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in page.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let mut parts = t.split(' ');
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || !line.starts_with(PREFIX) {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = match line[end..].strip_prefix('{') {
                Some(body) => matchers(&body[..body.find('}').unwrap_or(body.len())])
                    .into_iter()
                    .map(|(l, _, v)| (l, v))
                    .collect(),
                None => BTreeMap::new(),
            };
            samples
                .entry(line[..end].to_owned())
                .or_default()
                .push(labels);
        }
        Page { samples, types }
    }

    /// Whether a family is shown by `used`: its own name, or for a histogram or a
    /// summary one of its `_bucket`, `_sum`, `_count` series (the family's own name is
    /// no series of its own then).
    fn shown(&self, family: &str, used: &BTreeSet<String>) -> bool {
        used.contains(family)
            || matches!(
                self.types.get(family).map(String::as_str),
                Some("histogram" | "summary")
            ) && ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| used.contains(&format!("{family}{suffix}")))
    }

    /// What is wrong with `u` against this page (None: all there).
    fn problem(&self, u: &Use) -> Option<String> {
        // Series names as scraped: a histogram's are its `_bucket`, `_sum` and `_count`.
        let Some(series) = self.samples.get(&u.name) else {
            return Some(format!("{} is not exported", u.name));
        };
        let missing: Vec<String> = u
            .labels
            .iter()
            .filter(|(l, v)| !series.iter().any(|s| s.get(l) == Some(v)))
            .map(|(l, v)| format!("{l}=\"{v}\""))
            .collect();
        (!missing.is_empty())
            .then(|| format!("{} has no series with {}", u.name, missing.join(", ")))
    }
}

/// Every expression of the dashboard: the panels' targets and the variables' queries.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The rules file without its comment lines (they may name things that are no metric).
fn rules_text(rules: &str) -> String {
    rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn problems(exprs: &[String], page: &Page) -> Vec<String> {
    let all: BTreeSet<Use> = exprs.iter().flat_map(|e| uses(e)).collect();
    all.iter().filter_map(|u| page.problem(u)).collect()
}

/// A live daemon's `/metrics` has every metric and label value the dashboard and the
/// alert rules use, and the dashboard shows every family the daemon exports. The same
/// check reports a misspelled name or label value.
#[test]
fn dashboard_and_rules_use_only_exported_metrics() {
    const NAME: &str = "monitoring";
    let dashboard: Value = serde_json::from_str(&read(&dist("grafana/sip-dispatch.json")))
        .expect("the dashboard is JSON");
    let dash_exprs = dashboard_exprs(&dashboard);
    let rules = rules_text(&read(&dist("prometheus/sip-dispatch.rules.yml")));
    let rule_exprs = vec![rules.clone()];

    let bed = Bed::build(&workdir(), NAME, 2, Duration::from_secs(60));
    let metrics: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let mut run = bed.run_config(2);
    run.extra = vec!["--metrics".into(), metrics.to_string()];
    let daemon = bed.start_daemon(&run);
    wait_list(&bed, Duration::from_secs(10), "two backends up", |l| {
        l.len() == 2 && l.values().all(|b| b["state"] == "up")
    });
    let raw = bed.scrape_metrics(metrics);
    drop(daemon);
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let page = Page::parse(body);
    assert!(page.samples.len() >= 15, "a short page: {body}");

    let dash_uses: BTreeSet<String> = dash_exprs
        .iter()
        .flat_map(|e| uses(e))
        .map(|u| u.name)
        .collect();
    let rule_uses: BTreeSet<String> = uses(&rules).into_iter().map(|u| u.name).collect();
    eprintln!(
        "[{NAME}] page: {} metrics; dashboard: {} expressions, {} metrics; rules: {} metrics",
        page.samples.len(),
        dash_exprs.len(),
        dash_uses.len(),
        rule_uses.len()
    );
    for needed in ["sip_dispatch_backend_state", "sip_dispatch_backend_up"] {
        assert!(rule_uses.contains(needed), "the rules do not use {needed}");
    }

    let wrong_in_dashboard = problems(&dash_exprs, &page);
    let wrong_in_rules = problems(&rule_exprs, &page);
    assert!(
        wrong_in_dashboard.is_empty() && wrong_in_rules.is_empty(),
        "dashboard: {wrong_in_dashboard:#?}\nrules: {wrong_in_rules:#?}\npage:\n{body}"
    );
    let unshown: Vec<&String> = page
        .types
        .keys()
        .filter(|family| !page.shown(family, &dash_uses))
        .collect();
    assert!(
        unshown.is_empty(),
        "families the dashboard does not show: {unshown:?}"
    );

    // The check can fail: a wrong name, a wrong label value.
    let typo = vec![
        dash_exprs
            .join("\n")
            .replace("sip_dispatch_backend_up{", "sip_dispatch_backend_healthy{"),
    ];
    let found = problems(&typo, &page);
    assert_eq!(
        found,
        vec!["sip_dispatch_backend_healthy is not exported".to_string()],
        "{found:?}"
    );
    let typo = vec![rules.replace("state=\"down\"", "state=\"failed\"")];
    let found = problems(&typo, &page);
    assert_eq!(
        found,
        vec!["sip_dispatch_backend_state has no series with state=\"failed\"".to_string()],
        "{found:?}"
    );
}

/// Every query of the dashboard is PromQL that promtool accepts (its variables replaced
/// by values), written as recording rules of a scratch rules file.
#[test]
fn dashboard_queries_are_valid_promql() {
    let dashboard: Value = serde_json::from_str(&read(&dist("grafana/sip-dispatch.json")))
        .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("a target's expr").to_owned());
        }
    }
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
            .replace("$service", ".*");
        let quoted = serde_json::to_string(&e).expect("a string");
        rules.push_str(&format!(
            "      - record: dashboard:panel_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = workdir();
    std::fs::create_dir_all(&dir).expect("work dir");
    let file = dir.join("dashboard-queries.rules.yml");
    std::fs::write(&file, rules).expect("writing the scratch rules");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("running promtool (Debian package prometheus; cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "promtool check rules on the dashboard's queries:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
