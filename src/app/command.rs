//! A command declared with [`App::command`](super::App::command), kept by the app until the
//! command line runs it.

use crate::error::{BoxError, Error, Result};
use clap::ArgMatches;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::future::Future;
use std::marker::PhantomData;

/// A command declared with [`App::command`], its argument types erased.
pub(crate) trait CommandSpec: Send + Sync {
    fn name(&self) -> &str;
    fn clap(&self) -> clap::Command;
    fn run(&self, matches: &ArgMatches) -> Result<BoxFuture<'static, Result<(), BoxError>>>;
}

pub(crate) struct Command<A, F> {
    name: String,
    f: F,
    _args: PhantomData<fn() -> A>,
}

impl<A, F> Command<A, F> {
    pub(crate) fn new(name: String, f: F) -> Self {
        Self {
            name,
            f,
            _args: PhantomData,
        }
    }
}

impl<A, F, Fut, E> CommandSpec for Command<A, F>
where
    A: clap::Args + clap::FromArgMatches + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn clap(&self) -> clap::Command {
        A::augment_args(clap::Command::new(self.name.clone()))
    }

    fn run(&self, matches: &ArgMatches) -> Result<BoxFuture<'static, Result<(), BoxError>>> {
        let args = A::from_arg_matches(matches).map_err(|e| Error::Command {
            command: self.name.clone(),
            source: e.to_string().into(),
        })?;
        Ok((self.f)(args).map(|r| r.map_err(Into::into)).boxed())
    }
}
