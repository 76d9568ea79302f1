-- One strict debit: 90 % on the hot wallets 1..10, 10 % uniform over
-- 1..100000. Same request ids and amounts as uniform.sql.
\set pick random(1, 100)
\set wallet CASE WHEN :pick <= 90 THEN random(1, 10) ELSE random(1, 100000) END
\set milli random(1, 1000)
select tally_bench.debit(nextval('tally_bench.req_seq'), :wallet, :milli * 0.001);
