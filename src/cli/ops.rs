//! The tools every app's command line has beside `worker`: `send`, `agents` and `tables`. An
//! app may not declare a command with one of their names (see `App::check_command_names`).

use crate::agent::AgentRunner;
use crate::app::{App, Role};
use crate::error::{Error, Result};
use crate::metrics::{self, AgentInfo};
use bytes::Bytes;
use clap::{ArgMatches, Args, FromArgMatches};
use std::sync::Arc;
use std::time::Duration;

/// How often the in-process worker of `send` commits, on the embedded transport: the command
/// waits for the commit of what it sent.
const SEND_COMMIT_INTERVAL: Duration = Duration::from_millis(20);

/// Send a JSON value to a topic, or to the topic an agent reads
#[derive(Debug, Args)]
struct Send {
    /// A topic, or an agent: `@name` (its last dotted part will do)
    #[arg(value_name = "TOPIC_OR_AGENT")]
    target: String,
    /// The value, as JSON, e.g. '{"a": 4, "b": 8}'
    #[arg(value_name = "JSON", value_parser = json_value, allow_hyphen_values = true)]
    value: serde_json::Value,
    /// The record's key: encoded with the key codec of the agent's topic (JSON keys: the text
    /// as JSON, bare text as a string); for a topic no agent reads, its UTF-8 bytes
    #[arg(long, short)]
    key: Option<String>,
    /// The partition (default: the key's, else the next one round-robin)
    #[arg(long, short)]
    partition: Option<u32>,
}

/// `--json`, for the listing tools.
fn json_flag() -> clap::Arg {
    clap::Arg::new("json")
        .long("json")
        .action(clap::ArgAction::SetTrue)
        .help("Print a JSON array, one object per row")
}

/// Prints `rows` as a JSON array on one line.
fn print_json(rows: &[serde_json::Value]) -> Result<()> {
    let text = serde_json::to_string(rows)
        .map_err(|e| Error::Config(format!("cannot write JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

fn json_value(text: &str) -> std::result::Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// The tools' subcommands, except those the app declares itself.
pub(super) fn add_commands(mut cmd: clap::Command) -> clap::Command {
    let tools = [
        Send::augment_args(clap::Command::new("send")).about(
            "Send a JSON value to a topic or an agent; on the embedded transport it goes to \
             the app's running worker, or, with none, the app's agents run in this process \
             until they have processed it",
        ),
        clap::Command::new("agents")
            .about("List the app's agents: name, source topics, concurrency, sinks")
            .arg(json_flag()),
        clap::Command::new("tables")
            .about("List the app's tables: name, changelog topic, partitions")
            .arg(json_flag()),
    ];
    for tool in tools {
        if cmd.find_subcommand(tool.get_name()).is_none() {
            cmd = cmd.subcommand(tool);
        }
    }
    cmd
}

impl App {
    /// Runs the tool `name` if it is one (and the app has no command of that name).
    pub(super) async fn run_tool(&self, name: &str, matches: &ArgMatches) -> Option<Result<()>> {
        let own = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|c| c.name() == name);
        if own {
            return None;
        }
        match name {
            "send" => Some(match Send::from_arg_matches(matches) {
                Ok(args) => self.send(args).await,
                Err(e) => e.exit(),
            }),
            "agents" => Some(self.print_agents(matches.get_flag("json"))),
            "tables" => Some(self.print_tables(matches.get_flag("json"))),
            _ => None,
        }
    }

    fn print_tables(&self, json: bool) -> Result<()> {
        if json {
            let tables: Vec<serde_json::Value> = self
                .table_runners()
                .iter()
                .map(|t| {
                    let spec = t.changelog_spec();
                    serde_json::json!({
                        "table": t.name(),
                        "changelog": spec.name,
                        "partitions": spec.partitions,
                    })
                })
                .collect();
            return print_json(&tables);
        }
        let rows: Vec<Vec<String>> = self
            .table_runners()
            .iter()
            .map(|t| crate::table::table_row(&**t))
            .collect();
        print_columns(&crate::table::TABLE_COLUMNS, &rows);
        Ok(())
    }

    fn print_agents(&self, json: bool) -> Result<()> {
        if json {
            let agents = self
                .agent_runners()
                .iter()
                .map(|a| {
                    a.info().map(|i| {
                        serde_json::json!({
                            "agent": i.name,
                            "topics": i.topics,
                            "channel": i.channel,
                            "concurrency": i.concurrency,
                            "sinks": i.sinks,
                        })
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            return print_json(&agents);
        }
        let rows = self
            .agent_runners()
            .iter()
            .map(|a| a.info().map(|i| i.row()))
            .collect::<Result<Vec<_>>>()?;
        print_columns(&AgentInfo::COLUMNS, &rows);
        Ok(())
    }

    /// Prints `message` with the usage of `command` and exits with code 2, as clap does.
    fn usage_error(&self, command: &str, message: String) -> ! {
        let mut cli = self.cli();
        cli.build();
        let kind = clap::error::ErrorKind::InvalidValue;
        match cli.find_subcommand_mut(command) {
            Some(cmd) => cmd.error(kind, message).exit(),
            None => cli.error(kind, message).exit(),
        }
    }

    /// The topic `target` names (a topic, or an agent's topic), and the agent reading it.
    fn resolve(&self, target: &str) -> Result<Target, String> {
        let agents: Vec<Declared> = self
            .agent_runners()
            .into_iter()
            .filter_map(|a| a.info().ok().map(|i| (i, a)))
            .collect();
        let agent_topic = |(info, agent): &Declared| match info.topics.first() {
            Some(t) => Ok((t.clone(), Some(agent.clone()))),
            None => Err(format!(
                "agent {:?} reads a channel, which only the process that declares it can send to",
                info.name
            )),
        };
        let named = target.strip_prefix('@');
        if named.is_none() {
            if let Some((_, a)) = agents
                .iter()
                .find(|(i, _)| i.topics.iter().any(|t| t == target))
            {
                return Ok((target.to_owned(), Some(a.clone())));
            }
            if self.core.declared_topics().iter().any(|t| t == target) {
                return Ok((target.to_owned(), None));
            }
        }
        match find_agent(&agents, named.unwrap_or(target))? {
            Some(a) => agent_topic(a),
            None => Err(format!(
                "no topic or agent named {target:?}; agents: {}; topics: {}",
                metrics::list(&agents.iter().map(|(i, _)| &i.name).collect::<Vec<_>>()),
                metrics::list(&self.core.declared_topics())
            )),
        }
    }

    async fn send(&self, args: Send) -> Result<()> {
        let (topic, agent) = self
            .resolve(&args.target)
            .unwrap_or_else(|e| self.usage_error("send", e));
        let value = match &agent {
            Some(a) => a.encode_json(&args.value),
            None => Ok(Bytes::from(args.value.to_string())),
        }
        .unwrap_or_else(|e| self.usage_error("send", e));
        let key = match (&agent, args.key) {
            (Some(a), Some(k)) => Some(
                a.encode_key(&k)
                    .unwrap_or_else(|e| self.usage_error("send", e)),
            ),
            (None, k) => k.map(Bytes::from),
            (_, None) => None,
        };
        let embedded = self.is_embedded();
        if embedded {
            self.configure(|s| s.commit_interval = SEND_COMMIT_INTERVAL);
        }
        let worker = self.start_with(Role::for_command(embedded)).await?;
        let rt = worker.rt.clone();
        let spec = self.core.topic_spec(&topic, None);
        let sent = async {
            let at = rt
                .produce(&spec, args.partition, key, Some(value), Vec::new())
                .await?;
            let position = serde_json::json!({
                "topic": topic,
                "partition": at.partition,
                "offset": at.offset,
            });
            println!("{position}");
            if embedded {
                worker.processed(rt.settings.ask_timeout).await?;
            }
            Ok(())
        }
        .await;
        let stopped = worker.shutdown().await;
        sent.and(stopped)
    }
}

/// An agent of the app, with what it is.
type Declared = (AgentInfo, Arc<dyn AgentRunner>);
/// Where `send` sends: the topic, and the agent reading it (whose type checks the value).
type Target = (String, Option<Arc<dyn AgentRunner>>);

/// The agent named `name`, or whose name's last dotted part is `name`.
fn find_agent<'a>(agents: &'a [Declared], name: &str) -> Result<Option<&'a Declared>, String> {
    if let Some(a) = agents.iter().find(|(i, _)| i.name == name) {
        return Ok(Some(a));
    }
    let short: Vec<&Declared> = agents
        .iter()
        .filter(|(i, _)| i.name.rsplit('.').next() == Some(name))
        .collect();
    match short[..] {
        [] => Ok(None),
        [a] => Ok(Some(a)),
        _ => Err(format!(
            "{name:?} names several agents: {}",
            metrics::list(&short.iter().map(|(i, _)| &i.name).collect::<Vec<_>>())
        )),
    }
}

/// Prints rows under their headers, in aligned columns.
fn print_columns(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let text: String = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == last {
                    (*c).to_owned()
                } else {
                    format!("{c:<w$}  ")
                }
            })
            .collect();
        println!("{text}");
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
