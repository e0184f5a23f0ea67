//! [`Controller::start`]: the daemon's start-up, from the settings to a controller whose
//! tables are in force and whose link is attached. In order: the first DNS round, the
//! dataplane (pin lock, verifier), the sockets, the service ids and the state file, the
//! hash key, the first probes, the tables, the link; then the slow path, the ready line
//! and the SRV watchers. A start that fails leaves what `abandon_start` says.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::Semaphore,
    task::{JoinHandle, JoinSet},
};

use super::{
    Controller, MAX_BACKENDS_IN_ALL, Service, backends_with, log_answer, reload::Reloader,
};
use crate::{
    addrs::SourceAddrs,
    cli::{ForwardingMode, RunArgs},
    config::Settings,
    control,
    dataplane::{AttachMode, Dataplane, ModeChoice},
    hashkey::{self, KeyOrigin},
    metrics,
    nexthops::Follower,
    run::{ifindex, ready},
    select::Candidate,
    slowpath, srv,
    state::StateLock,
    sysctl::Forwarding,
};

/// A started daemon: its controller, and what the CLI's `run` serves, stops and drops
/// around the controller's loop.
pub struct Started {
    pub controller: Controller,
    pub control_listener: UnixListener,
    pub metrics_listener: Option<TcpListener>,
    /// The slow path's receive loops, one per service.
    pub slow_path: Vec<JoinHandle<()>>,
    /// The fast path's next-hop cache (None: not cached, the fast path asks the FIB).
    pub next_hops: Option<Follower>,
    /// The sysctl changed for forwarding, restored at a stop that detaches.
    pub ip_forwarding: Vec<Forwarding>,
    /// Held for as long as the daemon runs.
    pub state_lock: StateLock,
}

impl Controller {
    /// Starts the daemon from its settings (`args`: the flags they came from, read again
    /// by `reload`), attaching XDP in `xdp_mode`. Signal handlers are the caller's, and
    /// are installed first.
    pub async fn start(
        mut settings: Settings,
        args: RunArgs,
        xdp_mode: ModeChoice,
    ) -> anyhow::Result<Started> {
        let Settings {
            iface,
            hash_key: provisional_key,
            pin_path,
            reset,
            control: control_path,
            metrics,
            dns,
            health,
            affinity,
            ..
        } = settings.clone();
        let mut services: Vec<Service> = settings
            .services
            .iter()
            .enumerate()
            .map(|(id, s)| {
                let statics = s.backends.iter().map(Candidate::from).collect();
                let mut service = Service::new(id as u32, s.vip, statics, &s.srv);
                service.forwarding = s.forwarding;
                service
            })
            .collect();

        let iface_addrs = crate::addrs::addresses_of(&iface)
            .with_context(|| format!("listing the addresses of {iface}"))?;
        let (probe_source, encap_source) = source_addresses(&settings, &iface_addrs)?;
        for (family, ip) in [
            ("IPv4", probe_source.v4.map(std::net::IpAddr::from)),
            ("IPv6", probe_source.v6.map(Into::into)),
        ] {
            if let Some(ip) = ip {
                log::info!("{family} health checks come from {ip}");
            }
        }

        // DNS first: starting needs at least one known backend.
        let names: BTreeSet<String> = settings
            .services
            .iter()
            .flat_map(|s| s.srv.iter().cloned())
            .collect();
        let resolver = if names.is_empty() {
            None
        } else {
            Some(srv::resolver(&dns)?)
        };
        let mut first_answers = BTreeMap::new();
        let mut dns_errors = Vec::new();
        if let Some(resolver) = &resolver {
            for (name, answer) in resolve_names(resolver, &names).await {
                let name = &name;
                match answer {
                    Ok(answer) if backends_with(&services, name, &answer) > MAX_BACKENDS_IN_ALL => {
                        log::warn!(
                            "dns {name} refused: more than {} backends in all",
                            MAX_BACKENDS_IN_ALL
                        );
                        dns_errors.push(format!(
                            "{name}: refused, more than {} backends in all",
                            MAX_BACKENDS_IN_ALL
                        ));
                    }
                    Ok(answer) => {
                        if answer.targets.is_empty() {
                            dns_errors
                                .push(format!("{name}: its only target is \".\" (no service)"));
                        }
                        log_answer(name, &answer);
                        for s in &mut services {
                            s.set_srv(name, &answer);
                        }
                        first_answers.insert(name.clone(), answer);
                    }
                    Err(e) => {
                        log::warn!("dns {name} failed: {e:#} (retrying in the background)");
                        dns_errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        if !services.iter().any(Service::has_backends) {
            bail!("no backend known: {}", dns_errors.join("; "));
        }
        for s in services.iter().filter(|s| !s.has_backends()) {
            log::warn!(
                "service {} has no backend yet: its requests get 503 until DNS answers",
                s.vip
            );
        }

        // A link a previous daemon left pinned is forwarding now. Until this daemon is sure
        // to take over, nothing it uses is changed: first the pin lock, the verifier, every
        // socket, the service ids and the key file (each can fail), then the hash key, the
        // tables and the link.
        let (mut dp, ids) = Dataplane::load(&pin_path, &iface, reset, provisional_key, affinity)?;
        // (Read under the pin lock: no other daemon changes it now.)
        let adopted_link = pin_path.join(crate::dataplane::LINK_PIN).exists();
        let mut ip_forwarding = Vec::new();
        let endpoints = async {
            for v6 in [false, true] {
                if services.iter().any(|s| s.vip.is_ipv6() == v6) {
                    ip_forwarding.push(Forwarding::enable(&iface, v6)?);
                }
            }
            let mut slow_sockets = Vec::new();
            for spec in &settings.services {
                let encap = encap_source.get(spec.vip.is_ipv6());
                slow_sockets.push(slowpath::bind(spec.vip, spec.forwarding, &iface, encap).await?);
            }
            let control_listener = control::bind(&control_path)?;
            let metrics_listener = match metrics {
                Some(addr) => Some(metrics::bind(addr).await?),
                None => None,
            };
            anyhow::Ok((slow_sockets, control_listener, metrics_listener))
        }
        .await;
        let (slow_sockets, control_listener, metrics_listener) = match endpoints {
            Ok(bound) => bound,
            Err(e) => {
                abandon_start(&mut dp, adopted_link, false, ip_forwarding);
                return Err(e);
            }
        };
        let checked = (|| {
            let keep = assign_service_ids(&mut dp, &mut services)?;
            check_adopted_link(&dp, adopted_link)?;
            // Under the pin lock, like the key file, and before it: a start refused for a
            // bad state file creates no key file.
            let state_lock = crate::state::lock(&settings.state_file)?;
            let saved = crate::state::read(&settings.state_file)?;
            use_hash_key(&mut settings, &args)?;
            anyhow::Ok((keep, (state_lock, saved)))
        })();
        let (keep_until_attached, (state_lock, saved_state)) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                abandon_start(&mut dp, adopted_link, false, ip_forwarding);
                return Err(e);
            }
        };
        let key = settings.hash_key;
        dp.set_hash_key(key);
        for (spec, service) in settings.services.iter().zip(&services) {
            dp.set_forwarding(service.id, spec.forwarding.fwd_flags());
        }
        let reloader = Reloader::new(args, settings.clone());

        // Taking over: the maps the running program reads change from here on (after the
        // first probes), and the link last.
        let srv_watchers = srv::Watchers::new(dns, resolver);
        let mut ctl = Controller::new(
            (dp, ids),
            key,
            health,
            services,
            srv_watchers,
            Some(reloader),
        );
        ctl.set_call_idle(settings.call_idle);
        ctl.set_latency_aware(settings.latency_aware);
        ctl.set_probe_source(probe_source);
        ctl.restore(settings.state_file.clone(), saved_state);
        let mut wrote = false;
        let encap = sip_dispatch_common::EncapSource::new(encap_source.v4, encap_source.v6);
        let mode = match take_over(&mut ctl, xdp_mode, keep_until_attached, encap, &mut wrote).await
        {
            Ok(mode) => mode,
            Err(e) => {
                abandon_start(ctl.dataplane(), adopted_link, wrote, ip_forwarding);
                return Err(e);
            }
        };
        crate::dataplane::remove_outdated_pins(&pin_path);
        // Without it the fast path asks the FIB for every packet: slower, still correct.
        let next_hops = ctl
            .dataplane()
            .follow_next_hops()
            .inspect_err(|e| {
                log::error!("next hops: not cached, the fast path asks the FIB: {e:#}")
            })
            .ok();
        let mut slow = Vec::new();
        for (i, sock) in slow_sockets.into_iter().enumerate() {
            let s = &ctl.services()[i];
            let (id, tables, v6) = (s.id, s.tables(), s.vip.is_ipv6());
            let affinity = match ctl.dataplane().affinity_maps(id) {
                Ok(maps) => maps.map(|m| Box::new(m) as Box<dyn slowpath::AffinityStore + Send>),
                // Forwarding goes on by the table alone; the fast path keeps affinity.
                Err(e) => {
                    log::error!("slow path: no call affinity: {e:#}");
                    None
                }
            };
            slow.push(tokio::spawn(slowpath::serve(
                sock,
                key,
                tables,
                ctl.slow_path.clone(),
                slowpath::max_503_len(&iface, v6),
                affinity,
            )));
        }
        let backends = ctl.backend_infos().len();
        let vips: Vec<String> = ctl.services().iter().map(|s| s.vip.to_string()).collect();
        log::info!(
            "dispatching {} on {iface} in {} mode",
            vips.join(", "),
            mode.name()
        );
        ready(&format!(
            "iface={iface} mode={} backends={backends} services={}",
            mode.name(),
            vips.len()
        ));

        // Nothing from here to the main loop may end the daemon (the control socket file
        // would stay behind): DNS that cannot be watched now is logged, and a reload retries.
        if let Err(e) = ctl.watch_srv(&first_answers) {
            log::error!(
                "watching the SRV names failed: {e:#}; their backends stay as first resolved until a reload"
            );
        }
        Ok(Started {
            controller: ctl,
            control_listener,
            metrics_listener,
            slow_path: slow,
            next_hops,
            ip_forwarding,
            state_lock,
        })
    }
}

/// Interfaces XDP_REDIRECT may send to: every interface of this namespace but loopback.
fn tx_ports() -> Vec<(String, u32)> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name != "lo")
        .filter_map(|name| ifindex(&name).ok().map(|i| (name, i)))
        .collect()
}

/// Writes a new key file at first start, and warns about a key that is not secret.
/// Called under the pin lock, once every check before the take-over has passed: a start
/// that is refused or fails earlier creates no key file (and a missing file then takes
/// the key of the maps pinned there, read under the lock).
fn use_hash_key(settings: &mut Settings, args: &RunArgs) -> anyhow::Result<()> {
    if let KeyOrigin::NewKeyFile(path) = &settings.hash_key_origin {
        let path = path.clone();
        let pinned = match settings.reset {
            false => hashkey::pinned_key(&settings.pin_path),
            true => None,
        };
        settings.hash_key = hashkey::persist(&path, pinned.unwrap_or(settings.hash_key))?;
        match pinned {
            Some(_) => log::info!(
                "hash key file {} created (mode 0600) with the key of the maps pinned in {}",
                path.display(),
                settings.pin_path.display()
            ),
            None => log::info!("hash key file {} created (mode 0600)", path.display()),
        }
        settings.hash_key_origin = KeyOrigin::KeyFile(path);
    }
    if let Some(path) = &args.hash_key_file
        && matches!(
            settings.hash_key_origin,
            KeyOrigin::Flag | KeyOrigin::ConfigFile
        )
    {
        log::warn!(
            "--hash-key-file {} is not used: a `hash-key` is given",
            path.display()
        );
    }
    for w in hashkey::warnings(settings.hash_key, &settings.hash_key_origin) {
        log::warn!("{w}");
    }
    if settings.hash_key_origin == KeyOrigin::ConfigFile
        && let Some(config) = &args.config
        && let Ok(meta) = std::fs::metadata(config)
        && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o044 != 0
    {
        log::warn!(
            "the hash key is in {}, which group or others may read: use a `hash-key-file` (mode 0600)",
            config.display()
        );
    }
    Ok(())
}

/// The health checks' and ipip's source addresses: those given, and for each family
/// with an l2dsr or ipip service (whose backends hold the VIP themselves) the first
/// address of `iface_addrs` that is not a VIP when none is given. An ipip service's
/// family without an encap source takes the probe source.
pub fn source_addresses(
    settings: &Settings,
    iface_addrs: &[std::net::IpAddr],
) -> anyhow::Result<(SourceAddrs, SourceAddrs)> {
    let mut probe = settings.probe_source;
    let mut encap = settings.encap_source;
    for v6 in [false, true] {
        let family = || {
            settings
                .services
                .iter()
                .filter(move |s| s.vip.is_ipv6() == v6)
        };
        let dsr = family().find(|s| s.forwarding.answers_from_vip());
        if let (Some(service), None) = (dsr, probe.get(v6)) {
            let picked = iface_addrs.iter().copied().find(|&ip| {
                ip.is_ipv6() == v6
                    && crate::addrs::is_unicast(ip)
                    && !settings.services.iter().any(|s| s.vip.ip() == ip)
            });
            let Some(ip) = picked else {
                bail!(
                    "service {} forwards in {} mode, so health checks must not come from its VIP, and {} has no other IPv{} address: give --probe-source",
                    service.vip,
                    service.forwarding,
                    settings.iface,
                    if v6 { 6 } else { 4 }
                );
            };
            probe.set(ip);
        }
        let ipip = family().any(|s| s.forwarding == ForwardingMode::Ipip);
        if ipip
            && encap.get(v6).is_none()
            && let Some(ip) = probe.get(v6)
        {
            encap.set(ip);
        }
    }
    Ok((probe, encap))
}

/// At most this many SRV names are resolved at once at start (each resolution runs up to
/// `srv::LOOKUP_CONCURRENCY` address lookups of its own).
const START_RESOLVE_CONCURRENCY: usize = 4;

/// Resolves `names` concurrently, at most [`START_RESOLVE_CONCURRENCY`] at a time; an
/// answer or an error per name.
async fn resolve_names(
    resolver: &hickory_resolver::TokioResolver,
    names: &BTreeSet<String>,
) -> BTreeMap<String, anyhow::Result<srv::SrvAnswer>> {
    let permits = Arc::new(Semaphore::new(START_RESOLVE_CONCURRENCY));
    let mut jobs = JoinSet::new();
    for name in names {
        let (resolver, name, permits) = (resolver.clone(), name.clone(), permits.clone());
        jobs.spawn(async move {
            // The semaphore is never closed: a permit always comes.
            let _permit = permits.acquire_owned().await;
            let answer = srv::resolve(&resolver, &name).await;
            (name, answer)
        });
    }
    let mut answers = BTreeMap::new();
    while let Some(joined) = jobs.join_next().await {
        if let Ok((name, answer)) = joined {
            answers.insert(name, answer);
        }
    }
    for name in names {
        answers
            .entry(name.clone())
            .or_insert_with(|| Err(anyhow::anyhow!("dns {name}: the resolution did not finish")));
    }
    answers
}

/// The first probes, the hash key and redirect ports, our tables, then the link: a new
/// attachment, or our program swapped into the adopted link. Tables go in before the
/// link changes: a new link must not start with empty tables, and across a map layout
/// change the adopted program still reads the old maps. So the link is the last step
/// that can fail; the adopted services this configuration lacks (all but those in
/// `keep_until_attached`, the entries whose ids new VIPs reuse) are removed only after
/// it succeeded. `wrote` tells whether the maps the running program reads were changed.
async fn take_over(
    ctl: &mut Controller,
    xdp_mode: ModeChoice,
    keep_until_attached: Option<Vec<std::net::SocketAddr>>,
    encap: sip_dispatch_common::EncapSource,
    wrote: &mut bool,
) -> anyhow::Result<AttachMode> {
    ctl.initial_probe().await;
    let dp = &mut ctl.dp;
    *wrote = true;
    dp.write_hash_key()?;
    dp.set_encap_source(encap)?;
    for (name, i) in tx_ports() {
        if let Err(e) = dp.add_tx_port(i) {
            log::warn!("interface {name} cannot be a redirect target: {e:#}");
        }
    }
    if let Some(keep) = keep_until_attached {
        // Their ids go to new VIPs: their entries must not point at the new tables.
        dp.retain_services(&mut ctl.ids, &keep)?;
    }
    ctl.publish_all().await;
    injected_attach_failure()?;
    let mode = ctl.dataplane().attach(xdp_mode)?;
    // The link is ours: what an adopted set of maps holds beyond the configuration goes.
    if let Err(e) = ctl.forget_unconfigured() {
        log::warn!(
            "removing the adopted services this configuration lacks: {e:#} (they keep forwarding with their old tables)"
        );
    }
    Ok(mode)
}

/// A start that failed. With an adopted link, the link and its pins stay: as they were
/// if nothing was written yet (`wrote`), else forwarding with what this daemon wrote.
/// Without one, nothing of ours forwards: our link (if any) and the pins this daemon
/// made go, pins it found stay, and the sysctl it changed is restored.
fn abandon_start(dp: &mut Dataplane, adopted_link: bool, wrote: bool, forwarding: Vec<Forwarding>) {
    match (adopted_link, wrote) {
        (true, false) => {
            log::warn!(
                "start failed before taking over: the pinned XDP link and its maps are left as they were"
            );
        }
        (true, true) => log::warn!(
            "start failed after taking over the maps: the pinned XDP link keeps its old program, \
             which forwards with this daemon's hash key and tables (adopted services this \
             configuration lacks keep theirs)"
        ),
        (false, _) => {
            dp.abandon();
            forwarding.into_iter().for_each(Forwarding::restore);
        }
    }
}

/// Refuses a pinned link that is not an XDP link this daemon can take over, before
/// anything is written (the replacement itself is then the one step left to fail).
fn check_adopted_link(dp: &Dataplane, adopted_link: bool) -> anyhow::Result<()> {
    if adopted_link {
        dp.check_pinned_link()?;
    }
    Ok(())
}

/// Gives each service the id the adopted services map has for its VIP (new VIPs: ids
/// no adopted VIP uses), so that a reordered configuration keeps every VIP on its table.
/// Reads only. When new VIPs must reuse the ids of adopted VIPs no longer configured,
/// returns the VIPs whose entries stay until the take-over writes (all but those).
fn assign_service_ids(
    dp: &mut Dataplane,
    services: &mut [Service],
) -> anyhow::Result<Option<Vec<std::net::SocketAddr>>> {
    let adopted = dp.service_ids()?;
    let vips: Vec<std::net::SocketAddr> = services.iter().map(|s| s.vip).collect();
    let assignment =
        crate::service_ids::assign(&vips, &adopted, sip_dispatch_common::MAX_SERVICES)?;
    for (s, id) in services.iter_mut().zip(&assignment.ids) {
        if adopted.get(&s.vip) == Some(id) {
            log::info!("service {} keeps its id {id}", s.vip);
        }
        s.id = *id;
    }
    let kept = assignment.kept_before_attach(&adopted);
    if kept.is_some() {
        log::info!(
            "the adopted services {:?} go when the take-over starts: their ids go to new VIPs",
            assignment.reclaimed
        );
    }
    Ok(kept)
}

/// Debug builds only (tests): with `SIP_DISPATCH_TEST_FAIL_ATTACH=1` in the environment,
/// the take-over fails right before the link step, after every map write, so a test can
/// check what such a failure leaves. Release builds have no such switch.
fn injected_attach_failure() -> anyhow::Result<()> {
    #[cfg(debug_assertions)]
    if std::env::var_os("SIP_DISPATCH_TEST_FAIL_ATTACH").is_some_and(|v| v == "1") {
        bail!("attaching XDP: failure injected by SIP_DISPATCH_TEST_FAIL_ATTACH=1");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
