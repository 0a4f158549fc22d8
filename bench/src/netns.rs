//! Network namespaces for the network-cut fault of `hapg-bench failover`:
//! each node runs in a namespace of its own, joined by a veth pair to a
//! bridge on the host, where the monitor and the router run. Setting a
//! namespace's end of its link down isolates that node from the monitor,
//! the router and the other node at once, with nothing sent: the way a
//! pulled cable or a dead switch port looks.
//!
//! The subnet (a /24 in 10.0.0.0/8) and the names are chosen per run and
//! checked against what the host already has, so that leftovers of an
//! earlier run, or another run at the same time, do not collide. Needs root;
//! run under `flock /tmp/hapg-netns.lock` when other runs may use namespaces.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// The bridge and one namespace per node; removed on drop.
pub struct Net {
    bridge: String,
    /// The host's address on the bridge (the monitor's and router's, as the nodes see them).
    pub host_ip: String,
    nodes: Vec<NodeNet>,
    /// The first three octets of the subnet, `10.a.b`.
    prefix: String,
}

/// One node's namespace and link.
pub struct NodeNet {
    /// Node name.
    pub name: String,
    /// Namespace name.
    pub ns: String,
    host_if: String,
    ns_if: String,
    /// The node's address.
    pub ip: String,
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Net {
    /// Creates the bridge and a namespace for each of `names`, linked and up.
    pub fn create(names: &[&str]) -> Result<Net> {
        let seed = hapg::netns::run_seed();
        let tag = format!("{:05x}", seed % 0x10_0000);
        let prefix = hapg::netns::free_subnet(seed)
            .context("no free /24 in 10.100.0.0/9 for the bench's network namespaces")?;
        let mut net = Net {
            bridge: format!("hb{tag}br"),
            host_ip: format!("{prefix}.1"),
            nodes: Vec::new(),
            prefix: prefix.clone(),
        };
        ip(&["link", "add", "name", &net.bridge, "type", "bridge"])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host_ip),
            "dev",
            &net.bridge,
        ])?;
        for (i, name) in names.iter().enumerate() {
            let node = NodeNet {
                name: (*name).to_string(),
                ns: format!("hapg-bench-{tag}-{i}"),
                host_if: format!("hb{tag}h{i}"),
                ns_if: format!("hb{tag}n{i}"),
                ip: format!("{prefix}.{}", i + 2),
            };
            ip(&["netns", "add", &node.ns])?;
            // Pushed before it is complete, so that drop removes what exists.
            net.nodes.push(node);
            let node = net.nodes.last().context("just pushed")?;
            ip(&[
                "link",
                "add",
                &node.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &node.ns_if,
                "netns",
                &node.ns,
            ])?;
            ip(&["link", "set", &node.host_if, "master", &net.bridge])?;
            ip(&["link", "set", &node.host_if, "up"])?;
            node.in_ns(&[
                "addr",
                "add",
                &format!("{}/24", node.ip),
                "dev",
                &node.ns_if,
            ])?;
            node.in_ns(&["link", "set", &node.ns_if, "up"])?;
            node.in_ns(&["link", "set", "lo", "up"])?;
        }
        eprintln!(
            "network namespaces on {}.0/24, bridge {}",
            net.prefix, net.bridge
        );
        Ok(net)
    }

    /// The namespace of node `name`.
    pub fn node(&self, name: &str) -> Result<&NodeNet> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("node {name} has no network namespace"))
    }
}

impl NodeNet {
    fn in_ns(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.ns, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.ns]
    }

    /// Cuts the node's link: it reaches nothing and nothing reaches it.
    pub fn cut(&self) -> Result<()> {
        self.in_ns(&["link", "set", &self.ns_if, "down"]).map(drop)
    }

    /// Restores the link.
    pub fn heal(&self) -> Result<()> {
        self.in_ns(&["link", "set", &self.ns_if, "up"]).map(drop)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = ip(&["link", "del", &node.host_if]);
            let _ = ip(&["netns", "del", &node.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
