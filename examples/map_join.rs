//! The seed's "Streaming Map/Reduce" section: `map`, `kvmap`, `join` and `kvjoin` on the `pow2`
//! agent.
//!
//! ```console
//! $ cargo run --example map_join -- worker -l info
//! $ cargo run --example map_join -- map_join
//! -- map
//! RECEIVED REPLY: 1
//! RECEIVED REPLY: 49
//! ...
//! -- join
//! [1, 4, 9, 16, 25, 36, 49, 64]
//! ...
//! ```

use rill::prelude::*;
use rill::Bytes;

fn pow2(mut stream: Stream<i64>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            yield value * value;
        }
    }
}

/// Stream values through pow2 with map, kvmap, join and kvjoin.
#[derive(Debug, clap::Args)]
struct NoArgs {}

fn main() {
    let app = App::new("map-join");

    let pow2 = app.agent(pow2);

    app.command("map_join", move |NoArgs {}| {
        let pow2 = pow2.clone();
        async move {
            // map streams results as they come in (out-of-order).
            println!("-- map");
            let mut replies = pow2.map([1, 2, 3, 4, 5, 6, 7, 8]);
            while let Some(reply) = replies.next().await {
                println!("RECEIVED REPLY: {:?}", reply?);
            }

            // kvmap: the same, for (key, value) pairs; the key is the message key.
            println!("-- kvmap");
            let items = (1..=8).map(|n| (Bytes::from(format!("key-{n}")), n));
            let mut replies = pow2.kvmap(items);
            while let Some(reply) = replies.next().await {
                println!("RECEIVED REPLY: {:?}", reply?);
            }

            // join waits until all the steps are complete and returns the results in order.
            println!("-- join");
            let results = pow2.join([1, 2, 3, 4, 5, 6, 7, 8]).await?;
            assert_eq!(results, vec![1, 4, 9, 16, 25, 36, 49, 64]);
            println!("{results:?}");

            // kvjoin: the same, for (key, value) pairs.
            println!("-- kvjoin");
            let items = (1..=8).map(|n| (Bytes::from(format!("key-{n}")), n));
            let results = pow2.kvjoin(items).await?;
            assert_eq!(results, vec![1, 4, 9, 16, 25, 36, 49, 64]);
            println!("{results:?}");
            Ok::<_, rill::Error>(())
        }
    });

    app.main()
}
