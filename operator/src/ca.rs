//! The certificate authority for workload certificates: not built yet.
//!
//! When mTLS between nodes' proxies is built, this module will hold the
//! cluster's CA: it keeps its key in a Secret in the operator's namespace,
//! and signs only for the pods of the node that asks (the node's agent
//! proves which node it is with its ServiceAccount token, bound to the
//! node), with SPIFFE IDs from service accounts
//! (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`). The
//! signing decision will be a pure function here (request, node's pods ->
//! sign or refuse with a reason), the Secret and the agent-facing API at
//! the edges, like the other reconcilers. Until then the operator runs no
//! CA and its RBAC grants nothing for one.
