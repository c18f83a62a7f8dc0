"""HTTP edge: the Stripe webhook receiver, the usage API and the review pages."""
