//! The console's commands, parsed from a simple query's text (pure, with a
//! table test): PgBouncer's words, case-insensitive, an optional trailing
//! semicolon.

/// What the console was asked. `PAUSE`, `RESUME` and `RECONNECT` act on
/// the whole router, or with a database name on that database's sessions
/// and pools only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Show(Show),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    /// `KILL db`: ends the database's clients and server connections, and
    /// holds its new ones until `RESUME db`.
    Kill(String),
    Reload,
    KillClient(i32),
    Shutdown,
}

/// The SHOW commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Show {
    Pools,
    Clients,
    Servers,
    Stats,
    StatsTotals,
    StatsAverages,
    Databases,
    Lists,
    Config,
    Version,
    Routing,
    Failovers,
}

impl Show {
    pub const ALL: [(&'static str, Show); 12] = [
        ("POOLS", Show::Pools),
        ("CLIENTS", Show::Clients),
        ("SERVERS", Show::Servers),
        ("STATS", Show::Stats),
        ("STATS_TOTALS", Show::StatsTotals),
        ("STATS_AVERAGES", Show::StatsAverages),
        ("DATABASES", Show::Databases),
        ("LISTS", Show::Lists),
        ("CONFIG", Show::Config),
        ("VERSION", Show::Version),
        ("ROUTING", Show::Routing),
        ("FAILOVERS", Show::Failovers),
    ];
}

impl Command {
    /// Whether a `stats_users` user may run it (SHOW only).
    pub fn read_only(&self) -> bool {
        matches!(self, Command::Show(_))
    }

    /// The CommandComplete tag.
    pub fn tag(&self) -> &'static str {
        match self {
            Command::Show(_) => "SHOW",
            Command::Pause(_) => "PAUSE",
            Command::Resume(_) => "RESUME",
            Command::Reconnect(_) => "RECONNECT",
            Command::Kill(_) => "KILL",
            Command::Reload => "RELOAD",
            Command::KillClient(_) => "KILL_CLIENT",
            Command::Shutdown => "SHUTDOWN",
        }
    }
}

/// Why a text is no command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CommandError {
    #[error("empty query")]
    Empty,
    #[error("unknown command {0:?}")]
    Unknown(String),
    #[error("{0} takes {1}")]
    Arguments(&'static str, &'static str),
}

/// The commands the console accepts, for the error that lists them.
pub(crate) fn accepted() -> String {
    let shows: Vec<&str> = Show::ALL.iter().map(|(name, _)| *name).collect();
    format!(
        "SHOW {}; PAUSE [db], RESUME [db], RECONNECT [db], KILL db, RELOAD, KILL_CLIENT <id>, SHUTDOWN",
        shows.join("|")
    )
}

pub(crate) fn parse(text: &str) -> Result<Command, CommandError> {
    let text = text.trim().trim_end_matches(';').trim();
    // Keywords are case-insensitive, database names are not.
    let given: Vec<&str> = text.split_whitespace().collect();
    let words: Vec<String> = given.iter().map(|w| w.to_ascii_uppercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let none = |command: Command, name: &'static str, rest: &[&str]| {
        if rest.is_empty() {
            Ok(command)
        } else {
            Err(CommandError::Arguments(name, "no argument"))
        }
    };
    // A command that takes a database name or nothing.
    let database = |make: fn(Option<String>) -> Command, name: &'static str| match &given[1..] {
        [] => Ok(make(None)),
        [db] => Ok(make(Some(db.to_string()))),
        _ => Err(CommandError::Arguments(name, "a database name or nothing")),
    };
    match words.as_slice() {
        [] => Err(CommandError::Empty),
        ["SHOW", what] => Show::ALL
            .iter()
            .find(|(name, _)| name == what)
            .map(|(_, show)| Command::Show(*show))
            .ok_or_else(|| CommandError::Unknown(text.to_string())),
        ["PAUSE", ..] => database(Command::Pause, "PAUSE"),
        ["RESUME", ..] => database(Command::Resume, "RESUME"),
        ["RECONNECT", ..] => database(Command::Reconnect, "RECONNECT"),
        ["KILL", _] => Ok(Command::Kill(given[1].to_string())),
        ["KILL", ..] => Err(CommandError::Arguments("KILL", "a database name")),
        ["RELOAD", rest @ ..] => none(Command::Reload, "RELOAD", rest),
        ["SHUTDOWN", rest @ ..] => none(Command::Shutdown, "SHUTDOWN", rest),
        ["KILL_CLIENT", id] => id
            .parse()
            .map(Command::KillClient)
            .map_err(|_| CommandError::Arguments("KILL_CLIENT", "a client id (SHOW CLIENTS, ptr)")),
        ["KILL_CLIENT", ..] => Err(CommandError::Arguments(
            "KILL_CLIENT",
            "a client id (SHOW CLIENTS, ptr)",
        )),
        _ => Err(CommandError::Unknown(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_as_pgbouncer_spells_them() {
        let cases: &[(&str, Result<Command, CommandError>)] = &[
            ("SHOW POOLS", Ok(Command::Show(Show::Pools))),
            ("show stats_totals;", Ok(Command::Show(Show::StatsTotals))),
            ("  Show   Failovers ; ", Ok(Command::Show(Show::Failovers))),
            ("PAUSE", Ok(Command::Pause(None))),
            ("resume;", Ok(Command::Resume(None))),
            ("RECONNECT", Ok(Command::Reconnect(None))),
            ("pause AppDb;", Ok(Command::Pause(Some("AppDb".into())))),
            ("RESUME appdb", Ok(Command::Resume(Some("appdb".into())))),
            (
                "reconnect appdb",
                Ok(Command::Reconnect(Some("appdb".into()))),
            ),
            ("KILL appdb", Ok(Command::Kill("appdb".into()))),
            (
                "KILL",
                Err(CommandError::Arguments("KILL", "a database name")),
            ),
            (
                "PAUSE a b",
                Err(CommandError::Arguments(
                    "PAUSE",
                    "a database name or nothing",
                )),
            ),
            (
                "RELOAD now",
                Err(CommandError::Arguments("RELOAD", "no argument")),
            ),
            ("RELOAD", Ok(Command::Reload)),
            ("SHUTDOWN", Ok(Command::Shutdown)),
            ("KILL_CLIENT 42", Ok(Command::KillClient(42))),
            (
                "KILL_CLIENT x",
                Err(CommandError::Arguments(
                    "KILL_CLIENT",
                    "a client id (SHOW CLIENTS, ptr)",
                )),
            ),
            (
                "KILL_CLIENT",
                Err(CommandError::Arguments(
                    "KILL_CLIENT",
                    "a client id (SHOW CLIENTS, ptr)",
                )),
            ),
            ("SHOW MEM", Err(CommandError::Unknown("SHOW MEM".into()))),
            ("SELECT 1", Err(CommandError::Unknown("SELECT 1".into()))),
            (" ; ", Err(CommandError::Empty)),
        ];
        for (text, want) in cases {
            assert_eq!(&parse(text), want, "{text:?}");
        }
        assert!(Command::Show(Show::Pools).read_only());
        assert!(!Command::Pause(None).read_only());
        assert!(accepted().contains("SHOW POOLS|CLIENTS"));
    }
}
