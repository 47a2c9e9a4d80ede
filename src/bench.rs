//! `platform bench`: load generators that print their figures next to the raw baselines
//! measured in the same run.
