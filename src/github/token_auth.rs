//! GitHub tokens as API credentials (Stager's GithubAuthentication).
