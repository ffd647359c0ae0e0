//! ferry-tests: in-process TestCluster support for end-to-end tests
