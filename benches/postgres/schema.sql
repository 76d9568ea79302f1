-- PostgreSQL baseline for tally: a prepaid wallet debited per request, done
-- the straightforward way in one plpgsql function. Loaded by run.sh with
-- `psql -v ON_ERROR_STOP=1 -f schema.sql`.
--
-- Everything lives in its own schema, tally_bench, so the script can be
-- pointed at an existing server (TALLY_PG_URL) and only ever drops what it
-- created itself. Names inside the functions are schema-qualified, so callers
-- need no search_path.

set client_min_messages = warning;

drop schema if exists tally_bench cascade;
create schema tally_bench;

create table tally_bench.wallets (
    id      bigint primary key,
    balance numeric(20,6) not null check (balance >= 0)
);

-- One row per accepted debit. request_id is the idempotency key: a request
-- that is sent twice is applied once.
create table tally_bench.ledger (
    request_id bigint primary key,
    wallet     bigint not null,
    amount     numeric(20,6) not null check (amount > 0),
    at         timestamptz not null default now()
);

-- Request ids for the benchmark: every debit call takes nextval(), so ids are
-- unique across clients, threads, warm-ups and runs against the same load.
create sequence tally_bench.req_seq;

-- Debit p_amount from p_wallet, at most once per p_request.
--   'ok'           the ledger row was written and the balance decremented
--   'duplicate'    p_request was already applied; nothing changed
--   'insufficient' the wallet does not exist or holds less than p_amount;
--                  nothing changed (the ledger row is removed again)
-- Runs in the caller's transaction (one statement = one transaction in the
-- benchmark), at READ COMMITTED: the conditional UPDATE takes the row lock and
-- re-checks `balance >= amount` on the latest row version, so concurrent
-- debits of one wallet never overdraw it (the CHECK constraint backs that up).
create function tally_bench.debit(p_request bigint, p_wallet bigint, p_amount numeric)
returns text
language plpgsql
as $$
declare
    -- Round once to the stored scale, so the ledger row and the balance
    -- change are exactly the same amount.
    v_amount numeric(20,6) := round(p_amount, 6);
begin
    if v_amount is null or v_amount <= 0 then
        raise exception 'debit amount must be positive, got %', p_amount;
    end if;

    insert into tally_bench.ledger (request_id, wallet, amount)
    values (p_request, p_wallet, v_amount)
    on conflict (request_id) do nothing;
    if not found then
        return 'duplicate';
    end if;

    update tally_bench.wallets
       set balance = balance - v_amount
     where id = p_wallet
       and balance >= v_amount;
    if not found then
        -- Undo the ledger insert: a refused debit leaves no trace, so the
        -- same request id may be retried once the wallet is topped up.
        delete from tally_bench.ledger where request_id = p_request;
        return 'insufficient';
    end if;

    return 'ok';
end
$$;

create function tally_bench.balance(p_wallet bigint)
returns numeric
language sql
stable
as $$
    select balance from tally_bench.wallets where id = p_wallet
$$;

-- Seed: 100,000 wallets with 1e9 each, far more than a run can debit (a debit
-- is 0.001 to 1.000). Wallets 1..10 are the "hot" set of the hot-mix case.
insert into tally_bench.wallets (id, balance)
select g, 1000000000 from generate_series(1, 100000) as g;

-- What was seeded, for the conservation check at the end of a run:
-- seeded - sum(balance) must equal sum(ledger.amount).
create table tally_bench.seeded (total numeric not null);
insert into tally_bench.seeded select sum(balance) from tally_bench.wallets;

vacuum analyze tally_bench.wallets;
vacuum analyze tally_bench.ledger;
