//! The line protocol between the root agent and a per-user agent: one
//! systemd manager call per request, newline-delimited JSON, and
//! [`ManagerClient::execute`], which both sides use, so a call to the system
//! manager and a call relayed to a user's manager run the same code.
//!
//! A request is an [`Envelope`], one line, the op's fields beside its id:
//! `{"id":7,"op":"unit_of","pid":4242}`. The answer is a [`Reply`] with the
//! same id: `{"id":7,"result":"ok","info":{...}}` or
//! `{"id":7,"result":"err","message":"...","dbus_error":"org.freedesktop.systemd1.NoSuchUnit"}`.
//! Answers may come in any order; the id says which request they answer.
//! Every property change is a runtime one (`SetUnitProperties(..., true, ...)`).

use serde::{Deserialize, Serialize};

use super::systemd_bus::{CgroupProps, Error, ManagerClient, UnitInfo};

/// One call on a systemd manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ManagerOp {
    /// Which unit `pid` is in ([`ManagerClient::unit_of_pid`]).
    UnitOf { pid: u32 },
    /// [`ManagerClient::ensure_slice`].
    EnsureSlice {
        name: String,
        #[serde(default, skip_serializing_if = "CgroupProps::is_empty")]
        props: CgroupProps,
    },
    /// [`ManagerClient::start_scope`].
    StartScope {
        name: String,
        slice: String,
        pids: Vec<u32>,
        #[serde(default, skip_serializing_if = "CgroupProps::is_empty")]
        props: CgroupProps,
    },
    /// [`ManagerClient::set_properties`], at runtime.
    SetProperties { unit: String, props: CgroupProps },
    /// [`ManagerClient::get_cgroup_props`].
    GetProperties { unit: String },
    /// [`ManagerClient::attach_processes`].
    Attach {
        unit: String,
        #[serde(default)]
        subcgroup: String,
        pids: Vec<u32>,
    },
}

/// A request line: an op and the id its [`Reply`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    #[serde(flatten)]
    pub op: ManagerOp,
}

/// An answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    #[serde(flatten)]
    pub body: ReplyBody,
}

/// What an op came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ReplyBody {
    Ok {
        /// The unit the op was about (every op but `unit_of`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unit: Option<String>,
        /// `unit_of`'s answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        info: Option<UnitInfo>,
        /// `get_properties`' answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        props: Option<CgroupProps>,
    },
    Err {
        /// What failed, on which unit or pid, and why (the error's text).
        message: String,
        /// The D-Bus error name, when systemd answered with one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dbus_error: Option<String>,
    },
}

impl ReplyBody {
    fn unit(unit: String) -> Self {
        ReplyBody::Ok {
            unit: Some(unit),
            info: None,
            props: None,
        }
    }

    /// A request that could not be carried out at all (a line that does not
    /// parse, say).
    pub fn refused(message: impl Into<String>) -> Self {
        ReplyBody::Err {
            message: message.into(),
            dbus_error: None,
        }
    }
}

impl From<Error> for ReplyBody {
    fn from(e: Error) -> Self {
        ReplyBody::Err {
            dbus_error: e.dbus_name().map(str::to_string),
            message: e.to_string(),
        }
    }
}

impl ManagerClient {
    /// Carry out `op` on this manager.
    pub async fn execute(&self, op: ManagerOp) -> ReplyBody {
        let result = match op {
            ManagerOp::UnitOf { pid } => self.unit_of_pid(pid).await.map(|info| ReplyBody::Ok {
                unit: None,
                info: Some(info),
                props: None,
            }),
            ManagerOp::EnsureSlice { name, props } => self
                .ensure_slice(&name, &props)
                .await
                .map(|()| ReplyBody::unit(name)),
            ManagerOp::StartScope {
                name,
                slice,
                pids,
                props,
            } => self
                .start_scope(&name, &slice, &pids, &props)
                .await
                .map(ReplyBody::unit),
            ManagerOp::SetProperties { unit, props } => self
                .set_properties(&unit, &props, true)
                .await
                .map(|()| ReplyBody::unit(unit)),
            ManagerOp::GetProperties { unit } => {
                self.get_cgroup_props(&unit)
                    .await
                    .map(|props| ReplyBody::Ok {
                        unit: Some(unit),
                        info: None,
                        props: Some(props),
                    })
            }
            ManagerOp::Attach {
                unit,
                subcgroup,
                pids,
            } => self
                .attach_processes(&unit, &subcgroup, &pids)
                .await
                .map(|()| ReplyBody::unit(unit)),
        };
        result.unwrap_or_else(ReplyBody::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuate::systemd_bus::Setting;

    #[test]
    fn request_line_is_flat() {
        let env = Envelope {
            id: 7,
            op: ManagerOp::UnitOf { pid: 4242 },
        };
        let line = serde_json::to_string(&env).unwrap();
        assert_eq!(line, r#"{"id":7,"op":"unit_of","pid":4242}"#);
        assert_eq!(serde_json::from_str::<Envelope>(&line).unwrap(), env);

        let env = Envelope {
            id: u64::MAX,
            op: ManagerOp::SetProperties {
                unit: "app-corral-game.slice".into(),
                props: CgroupProps {
                    allowed_cpus: Setting::Set(vec![0, 1]),
                    cpu_weight: Setting::Keep,
                },
            },
        };
        let line = serde_json::to_string(&env).unwrap();
        assert_eq!(
            line,
            r#"{"id":18446744073709551615,"op":"set_properties","unit":"app-corral-game.slice","props":{"allowed_cpus":{"set":[0,1]}}}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&line).unwrap(), env);
    }

    #[test]
    fn optional_fields_default() {
        let env: Envelope = serde_json::from_str(
            r#"{"id":1,"op":"start_scope","name":"a.scope","slice":"b.slice","pids":[3]}"#,
        )
        .unwrap();
        assert_eq!(
            env.op,
            ManagerOp::StartScope {
                name: "a.scope".into(),
                slice: "b.slice".into(),
                pids: vec![3],
                props: CgroupProps::default()
            }
        );
        let env: Envelope =
            serde_json::from_str(r#"{"id":2,"op":"attach","unit":"u.scope","pids":[1,2]}"#)
                .unwrap();
        assert_eq!(
            env.op,
            ManagerOp::Attach {
                unit: "u.scope".into(),
                subcgroup: String::new(),
                pids: vec![1, 2]
            }
        );
    }

    #[test]
    fn reply_lines() {
        let ok = Reply {
            id: 3,
            body: ReplyBody::unit("x.scope".into()),
        };
        let line = serde_json::to_string(&ok).unwrap();
        assert_eq!(line, r#"{"id":3,"result":"ok","unit":"x.scope"}"#);
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), ok);

        let err = Reply {
            id: 4,
            body: ReplyBody::Err {
                message: "GetUnit for unit x.scope failed".into(),
                dbus_error: Some("org.freedesktop.systemd1.NoSuchUnit".into()),
            },
        };
        let line = serde_json::to_string(&err).unwrap();
        assert_eq!(
            line,
            r#"{"id":4,"result":"err","message":"GetUnit for unit x.scope failed","dbus_error":"org.freedesktop.systemd1.NoSuchUnit"}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), err);
    }
}
