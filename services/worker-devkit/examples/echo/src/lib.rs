//! An example native worker: a [`CommandWorker`] with two commands.
//!
//! - `{"command":"echo","payload":...}` answers
//!   `{"command":"echo","success":true,"echo":payload,"region":...}`, where
//!   `region` is the event's `region` extension (a worker's config is
//!   stamped onto its events as extensions).
//! - `{"command":"gateway","service":...,"method":...,"request":{...}}`
//!   calls the api's Gateway and answers its JSON response (or the error
//!   envelope when the call fails).
//!
//! `cargo build -p virtufin-worker-example-echo` builds
//! `libvirtufin_echo_worker.so`; create the worker with MIME type
//! `application/x-native-dll` and that file as its code.

use serde_json::{Value, json};
use virtufin_worker_devkit::{Command, CommandWorker, Context, Event, WorkerError, export_worker};

pub enum EchoCommand {
    Echo,
    Gateway,
}

impl Command for EchoCommand {
    const NAMES: &'static [&'static str] = &["echo", "gateway"];

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "echo" => Some(Self::Echo),
            "gateway" => Some(Self::Gateway),
            _ => None,
        }
    }
}

#[derive(Default)]
pub struct Echo {
    handled: u64,
}

impl CommandWorker for Echo {
    type Command = EchoCommand;

    fn source(&self) -> &str {
        "urn:com.virtufin.example.echo"
    }

    fn response_type(&self) -> &str {
        "com.virtufin.example.echo.reply"
    }

    fn handle_command(
        &mut self,
        ctx: &Context,
        input: &Event,
        command: EchoCommand,
        data: Value,
    ) -> Result<Option<Value>, WorkerError> {
        self.handled += 1;
        match command {
            EchoCommand::Echo => {
                ctx.info(&format!("echo #{} ({})", self.handled, input.id));
                Ok(Some(json!({
                    "command": "echo",
                    "success": true,
                    "echo": data.get("payload").cloned().unwrap_or(Value::Null),
                    "region": input.extension("region"),
                    "handled": self.handled,
                })))
            }
            EchoCommand::Gateway => {
                let field = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or("");
                let request = data.get("request").cloned().unwrap_or(json!({}));
                let answer =
                    ctx.gateway_call(field("service"), field("method"), &request.to_string())?;
                Ok(Some(json!({
                    "command": "gateway",
                    "success": true,
                    "response": serde_json::from_str::<Value>(&answer).unwrap_or(Value::String(answer)),
                })))
            }
        }
    }
}

export_worker!(Echo);
