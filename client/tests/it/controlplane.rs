//! End to end: the control plane example (API, nodes, two controller replicas) on a 3-member
//! Keel cluster, with faults: the active controller dies, a Keel member dies, a node dies.

#[path = "../../examples/controlplane/cp.rs"]
mod cp;

use std::time::{Duration, Instant};

use cp::{Api, Controller, NodeAgent, Spec};
use keel_client::Client;

use crate::cluster::{Cluster, opts};

/// The cluster state matches every replica set: pod count and image, all pods on `nodes`,
/// status written for the current generation.
async fn converged(api: &Api, nodes: &[&str]) -> Result<(), String> {
    for v in api.list().await.map_err(|e| e.to_string())? {
        let rs = v.object;
        let pods = api.pods(&rs.name).await.map_err(|e| e.to_string())?;
        if pods.len() != rs.spec.replicas as usize {
            return Err(format!(
                "{}: {} pods, want {}",
                rs.name,
                pods.len(),
                rs.spec.replicas
            ));
        }
        if let Some(p) = pods.iter().find(|p| p.image != rs.spec.image) {
            return Err(format!("{}: pod {} runs {}", rs.name, p.name, p.image));
        }
        if let Some(p) = pods.iter().find(|p| !nodes.contains(&p.node.as_str())) {
            return Err(format!("{}: pod {} on {}", rs.name, p.name, p.node));
        }
        if rs.status.replicas != rs.spec.replicas || rs.status.observed_generation != rs.generation
        {
            return Err(format!(
                "{}: status {:?} at generation {}",
                rs.name, rs.status, rs.generation
            ));
        }
    }
    Ok(())
}

async fn wait_converged(api: &Api, nodes: &[&str], what: &str) -> Duration {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(60) {
        match converged(api, nodes).await {
            Ok(()) => return start.elapsed(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("not converged after {what}: {last}");
}

async fn client(cluster: &Cluster) -> Client {
    Client::connect(cluster.endpoints(), opts()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlplane_converges_through_faults() {
    let mut cluster = Cluster::start(3).await;
    let api = Api::new(client(&cluster).await);

    // Probe: the controller needs the Election service.
    let probe = api.client.lease_grant(5).await.unwrap();
    if let Err(keel_client::Error::Unimplemented(m)) =
        api.client.campaign("/cp/probe", "x", probe.id).await
    {
        eprintln!("SKIPPED: no Election service on the server yet ({m})");
        return;
    }
    api.client.lease_revoke(probe.id).await.unwrap();

    let spawn_node = |c: Client, name: &str| {
        tokio::spawn(
            NodeAgent {
                client: c,
                name: name.to_string(),
                ttl: 2,
            }
            .run(),
        )
    };
    let node_a = spawn_node(client(&cluster).await, "node-a");
    let _node_b = spawn_node(client(&cluster).await, "node-b");
    let mut controllers = Vec::new();
    for id in ["c1", "c2"] {
        let mut ctl = Controller::new(client(&cluster).await, id);
        ctl.leader_ttl = 2;
        ctl.pod_ttl = 2;
        let leading = ctl.leading.clone();
        controllers.push((id, leading, tokio::spawn(ctl.run())));
    }

    api.apply(
        "web",
        Spec {
            replicas: 3,
            image: "nginx:1".into(),
        },
    )
    .await
    .unwrap();
    api.apply(
        "db",
        Spec {
            replicas: 2,
            image: "pg:15".into(),
        },
    )
    .await
    .unwrap();
    let t = wait_converged(&api, &["node-a", "node-b"], "initial apply").await;
    eprintln!("converged in {t:?}");

    // Kill the active controller; change the desired state; the other replica takes over.
    let active = api.client.election_leader(cp::ELECTION).await.unwrap();
    let active = active.value_str().to_string();
    let idx = controllers
        .iter()
        .position(|(id, _, _)| *id == active)
        .unwrap();
    let (_, _, handle) = controllers.remove(idx);
    handle.abort();
    api.apply(
        "web",
        Spec {
            replicas: 5,
            image: "nginx:1".into(),
        },
    )
    .await
    .unwrap();
    let t = wait_converged(&api, &["node-a", "node-b"], "controller killed").await;
    eprintln!("converged after the active controller died in {t:?}");
    let (survivor, leading, _) = &controllers[0];
    assert!(*leading.lock().unwrap(), "{survivor} leads");
    assert_eq!(
        api.client
            .election_leader(cp::ELECTION)
            .await
            .unwrap()
            .value_str(),
        *survivor
    );

    // Kill the Keel leader; roll out a new image and scale down meanwhile.
    let leader = cluster.leader().await;
    cluster.members[leader].kill();
    api.apply(
        "db",
        Spec {
            replicas: 1,
            image: "pg:16".into(),
        },
    )
    .await
    .unwrap();
    let t = wait_converged(&api, &["node-a", "node-b"], "keel member killed").await;
    eprintln!("converged after a keel member died in {t:?}");
    cluster.members[leader].start();
    cluster.wait_ready(Duration::from_secs(30)).await;

    // Kill a node: its pods' leases expire and the controller reschedules them.
    node_a.abort();
    let t = wait_converged(&api, &["node-b"], "node-a killed").await;
    eprintln!("converged after node-a died in {t:?}");
    let all: usize = [
        api.pods("web").await.unwrap().len(),
        api.pods("db").await.unwrap().len(),
    ]
    .iter()
    .sum();
    assert_eq!(all, 6);

    // Deleting a replica set removes its pods.
    api.delete("db").await.unwrap();
    let start = Instant::now();
    while !api.pods("db").await.unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "db pods not removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
