//! Group commit: requests of concurrent runs to one target, gathered into
//! one request. A group opens with the first request and goes once every
//! run on the target has joined it, once it is full, or once its window
//! ends, whichever comes first. A run alone on its target never waits.
//!
//! Grouping only saves requests; it never changes what a run does: a run
//! whose group could not answer it (the request that carried it was
//! cancelled) sends its own request, as it would have alone.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Sends a group's items as one request; one answer per item, in order.
pub(super) type Request<T, R> =
    Box<dyn FnOnce(Vec<T>) -> Pin<Box<dyn Future<Output = Vec<R>> + Send>> + Send>;

/// How long a group waits, and how much it may hold.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// The longest a group waits for more runs.
    pub window: Duration,
    /// The most a group holds, in the items' weights (documents, bytes).
    pub capacity: usize,
}

/// One kind of request to one target.
pub(super) struct Lane<T, R> {
    open: Mutex<Open<T, R>>,
}

struct Open<T, R> {
    group: Option<Group<T, R>>,
    /// The id of the next group.
    next: u64,
}

struct Group<T, R> {
    id: u64,
    deadline: Instant,
    items: Vec<T>,
    answers: Vec<oneshot::Sender<R>>,
    weight: usize,
    request: Request<T, R>,
}

impl<T: Send + 'static, R: Send + 'static> Lane<T, R> {
    pub(super) fn new() -> Self {
        Lane {
            open: Mutex::new(Open {
                group: None,
                next: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open<T, R>> {
        // Every change under the lock leaves the lane whole: a poisoned
        // lock holds nothing half done.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `item` to the open group (opening one with `request` if none is
    /// open) and waits for its answer. `runs` is how many runs are on the
    /// target, this one included. The item comes back when it is to be sent
    /// alone: the run is alone on its target, or the item fills a group by
    /// itself. None: its group's request ended without an answer (its task
    /// panicked, or the runtime is shutting down).
    pub(super) async fn join(
        &self,
        item: T,
        weight: usize,
        runs: usize,
        limits: Limits,
        request: impl FnOnce() -> Request<T, R>,
    ) -> Result<Option<R>, T> {
        if limits.window.is_zero() || weight >= limits.capacity {
            return Err(item);
        }
        let (answer, answered) = oneshot::channel();
        let joined = Joining {
            item,
            weight,
            runs,
            answer,
        };
        let (id, deadline) = self.enter(joined, limits, request)?;
        tokio::pin!(answered);
        tokio::select! {
            answer = &mut answered => return Ok(answer.ok()),
            () = tokio::time::sleep_until(deadline) => {}
        }
        self.close(id);
        Ok(answered.await.ok())
    }

    /// Puts an item in the open group, which goes at once if every run has
    /// joined or it is full; returns the group's id and deadline. Err: the
    /// run is alone on its target.
    fn enter(
        &self,
        joining: Joining<T, R>,
        limits: Limits,
        request: impl FnOnce() -> Request<T, R>,
    ) -> Result<(u64, Instant), T> {
        let mut open = self.lock();
        if open.group.is_none() && joining.runs <= 1 {
            return Err(joining.item);
        }
        let fits = |g: &Group<T, R>| g.weight + joining.weight <= limits.capacity;
        if !open.group.as_ref().is_none_or(fits) {
            dispatch(open.group.take());
        }
        if open.group.is_none() {
            open.next += 1;
        }
        let id = open.next;
        let group = open.group.get_or_insert_with(|| Group {
            id,
            deadline: Instant::now() + limits.window,
            items: Vec::new(),
            answers: Vec::new(),
            weight: 0,
            request: request(),
        });
        group.items.push(joining.item);
        group.answers.push(joining.answer);
        group.weight += joining.weight;
        let (id, deadline) = (group.id, group.deadline);
        if group.items.len() >= joining.runs || group.weight >= limits.capacity {
            dispatch(open.group.take());
        }
        Ok((id, deadline))
    }

    /// Sends group `id` if it is still open (its window ended).
    fn close(&self, id: u64) {
        let mut open = self.lock();
        if open.group.as_ref().is_some_and(|g| g.id == id) {
            dispatch(open.group.take());
        }
    }
}

/// A run's item on its way into a group.
struct Joining<T, R> {
    item: T,
    weight: usize,
    runs: usize,
    answer: oneshot::Sender<R>,
}

/// Sends a closed group on its own task, so that a run cancelled meanwhile
/// cancels no one else's request.
fn dispatch<T: Send + 'static, R: Send + 'static>(group: Option<Group<T, R>>) {
    let Some(group) = group else { return };
    tokio::spawn(async move {
        let answers = (group.request)(group.items).await;
        for (to, answer) in group.answers.into_iter().zip(answers) {
            // A run that stopped waiting has nothing to be told.
            let _ = to.send(answer);
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    const LIMITS: Limits = Limits {
        window: Duration::from_millis(50),
        capacity: 10,
    };

    /// A sender that counts its requests and answers each item with the
    /// group's size.
    fn counting(requests: &Arc<AtomicUsize>) -> impl FnOnce() -> Request<u32, (u32, usize)> {
        let requests = requests.clone();
        move || {
            Box::new(move |items: Vec<u32>| {
                requests.fetch_add(1, Ordering::SeqCst);
                let size = items.len();
                Box::pin(async move { items.into_iter().map(|i| (i, size)).collect() })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn runs_on_one_target_share_one_request_that_goes_once_all_have_joined() {
        let lane = Arc::new(Lane::new());
        let requests = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let joins = (0..3).map(|i| {
            let (lane, requests) = (lane.clone(), requests.clone());
            tokio::spawn(async move { lane.join(i, 1, 3, LIMITS, counting(&requests)).await })
        });
        let answers: Vec<_> = futures::future::join_all(joins).await;
        let answers: Vec<_> = answers
            .into_iter()
            .map(|a| a.unwrap().unwrap().unwrap())
            .collect();
        assert_eq!(answers, [(0, 3), (1, 3), (2, 3)]);
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        assert!(started.elapsed() < LIMITS.window, "no wait once all joined");
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_goes_when_its_window_ends_and_a_run_alone_never_waits() {
        let lane = Lane::new();
        let requests = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let answer = lane.join(7, 1, 4, LIMITS, counting(&requests)).await;
        assert_eq!(answer, Ok(Some((7, 1))));
        assert_eq!(started.elapsed(), LIMITS.window);
        let alone = lane.join(8, 1, 1, LIMITS, counting(&requests)).await;
        assert_eq!(alone, Err(8), "alone on its target: sent alone");
        let big = lane.join(9, 10, 4, LIMITS, counting(&requests)).await;
        assert_eq!(big, Err(9), "fills a group by itself");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_group_goes_at_once_and_the_next_run_opens_another() {
        let lane = Arc::new(Lane::new());
        let requests = Arc::new(AtomicUsize::new(0));
        let first = {
            let (lane, requests) = (lane.clone(), requests.clone());
            tokio::spawn(async move { lane.join(1, 6, 9, LIMITS, counting(&requests)).await })
        };
        tokio::task::yield_now().await;
        let started = Instant::now();
        let second = lane.join(2, 6, 9, LIMITS, counting(&requests)).await;
        assert_eq!(first.await.unwrap(), Ok(Some((1, 1))));
        assert_eq!(second, Ok(Some((2, 1))));
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!(
            started.elapsed(),
            LIMITS.window,
            "the second waited its own window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_whose_group_request_ended_without_an_answer_is_told_so() {
        let lane = Lane::<u32, u32>::new();
        let lost = || -> Request<u32, u32> { Box::new(|_| Box::pin(async { Vec::new() })) };
        assert_eq!(lane.join(1, 1, 2, LIMITS, lost).await, Ok(None));
    }
}
