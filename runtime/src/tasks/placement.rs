//! Placement: which agent takes a task. Kept behind the small [`Placer`]
//! trait so the resource manager (weighted DRF, roles, quotas) can replace the
//! first-fit placer here without touching the supervisor.

use dprim::tasks::{Constraint, Resources, TaskSpec};
use std::collections::BTreeMap;

/// An agent as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentView {
    /// The agent's id.
    pub id: String,
    /// What it offers in total.
    pub total: Resources,
    /// What its running and assigned tasks use.
    pub used: Resources,
    /// Its attributes (`rack`, `zone`, ...).
    pub attributes: BTreeMap<String, String>,
}

impl AgentView {
    /// Whether `need` fits in what is left.
    pub fn fits(&self, need: &Resources) -> bool {
        let free_ports = |p: &u16| self.total.ports.contains(p) && !self.used.ports.contains(p);
        self.total.cpus - self.used.cpus + 1e-9 >= need.cpus
            && self.total.mem_bytes.saturating_sub(self.used.mem_bytes) >= need.mem_bytes
            && self.total.disk_bytes.saturating_sub(self.used.disk_bytes) >= need.disk_bytes
            && need.ports.iter().all(free_ports)
    }

    /// Whether the agent's attributes satisfy every constraint.
    pub fn satisfies(&self, constraints: &[Constraint]) -> bool {
        constraints.iter().all(|c| match c {
            Constraint::Equals(k, v) => self.attributes.get(k) == Some(v),
            Constraint::NotEquals(k, v) => self.attributes.get(k) != Some(v),
        })
    }
}

/// Chooses an agent for a task, or says why none can take it.
pub trait Placer: Send + Sync {
    /// The chosen agent's id, or the reason the task must stay pending.
    fn place(&self, task: &TaskSpec, agents: &[AgentView]) -> Result<String, String>;
}

/// The first agent (in id order) that satisfies the constraints and has room.
#[derive(Clone, Copy, Debug, Default)]
pub struct FirstFit;

impl Placer for FirstFit {
    fn place(&self, task: &TaskSpec, agents: &[AgentView]) -> Result<String, String> {
        if agents.is_empty() {
            return Err("no agent is registered".into());
        }
        let mut sorted: Vec<&AgentView> = agents.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        let allowed: Vec<&AgentView> = sorted
            .into_iter()
            .filter(|a| a.satisfies(&task.constraints))
            .collect();
        if allowed.is_empty() {
            return Err(format!(
                "no agent satisfies the constraints {:?}",
                task.constraints
            ));
        }
        if let Some(a) = allowed.iter().find(|a| a.fits(&task.resources)) {
            return Ok(a.id.clone());
        }
        let r = &task.resources;
        let bigger_than_any = allowed.iter().all(|a| {
            a.total.cpus + 1e-9 < r.cpus
                || a.total.mem_bytes < r.mem_bytes
                || a.total.disk_bytes < r.disk_bytes
        });
        Err(if bigger_than_any {
            format!(
                "the task needs cpus={} mem={} disk={}, more than any agent has in total",
                r.cpus,
                human_bytes(r.mem_bytes),
                human_bytes(r.disk_bytes)
            )
        } else {
            "no agent has enough free resources now; waiting for some to free up".into()
        })
    }
}

/// `67108864` -> `64MiB`: exact binary units where they divide evenly.
pub fn human_bytes(bytes: u64) -> String {
    for (unit, size) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, cpus: f64, zone: &str) -> AgentView {
        AgentView {
            id: id.into(),
            total: Resources {
                cpus,
                mem_bytes: 1 << 30,
                disk_bytes: 1 << 30,
                ports: vec![8000, 8001],
            },
            used: Resources::default(),
            attributes: [("zone".to_string(), zone.to_string())].into(),
        }
    }

    fn task(cpus: f64, constraints: Vec<Constraint>) -> TaskSpec {
        TaskSpec {
            command: "true".into(),
            resources: Resources {
                cpus,
                ..Resources::default()
            },
            constraints,
            ..TaskSpec::default()
        }
    }

    #[test]
    fn first_fit_in_id_order_honouring_constraints() {
        let agents = [agent("b", 4.0, "z1"), agent("a", 1.0, "z2")];
        assert_eq!(FirstFit.place(&task(1.0, vec![]), &agents), Ok("a".into()));
        assert_eq!(FirstFit.place(&task(2.0, vec![]), &agents), Ok("b".into()));
        let z2 = vec![Constraint::Equals("zone".into(), "z2".into())];
        assert_eq!(
            FirstFit.place(&task(0.5, z2.clone()), &agents),
            Ok("a".into())
        );
        let not_z2 = vec![Constraint::NotEquals("zone".into(), "z2".into())];
        assert_eq!(FirstFit.place(&task(0.5, not_z2), &agents), Ok("b".into()));
        let err = FirstFit.place(&task(2.0, z2), &agents).unwrap_err();
        assert!(err.contains("more than any agent"), "{err}");
    }

    #[test]
    fn used_resources_and_ports_count() {
        let mut a = agent("a", 2.0, "z1");
        a.used.cpus = 1.5;
        a.used.ports = vec![8000];
        let mut t = task(0.5, vec![]);
        assert!(a.fits(&t.resources));
        t.resources.ports = vec![8000];
        assert!(!a.fits(&t.resources));
        let err = FirstFit.place(&task(1.0, vec![]), &[a]).unwrap_err();
        assert!(err.contains("waiting"), "{err}");
        assert!(FirstFit.place(&task(1.0, vec![]), &[]).is_err());
    }
}
