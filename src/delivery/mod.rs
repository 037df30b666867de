//! Calling the users' HTTP APIs for matching changes (on_change rules):
//! request building, ordering, debounce, retries and dead letters. Arrives
//! with the change-listener role.
